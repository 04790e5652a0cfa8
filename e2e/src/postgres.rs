//! A real PostgreSQL server from the distribution's packages (`postgresql`), on loopback with
//! password authentication, for the database secrets engine. PostgreSQL refuses to run as root,
//! so under root the server runs as the `postgres` user the package creates.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{controlplane::free_port, run, run_ok, spawn_logged};

/// The cluster's superuser (bootstrap and test inspection only).
pub const SUPERUSER: &str = "postgres";

/// The account Vault connects as: it may create roles and hand out the two group roles below,
/// nothing else (not a superuser, owns no table).
pub const VAULT_ADMIN: &str = "vault_admin";

/// What the platform team sets up once: Vault's least-privileged account, the group roles the
/// grant profiles put credentials in (`palisade_readonly` reads `orders`,
/// `palisade_readwrite` also writes it) and a table no profile reaches (`payroll`).
const PLATFORM_SQL: &str = "
CREATE TABLE IF NOT EXISTS orders (id int);
CREATE TABLE IF NOT EXISTS payroll (salary int);
CREATE ROLE palisade_readonly NOLOGIN;
CREATE ROLE palisade_readwrite NOLOGIN;
GRANT SELECT ON orders TO palisade_readonly;
GRANT SELECT, INSERT, UPDATE ON orders TO palisade_readwrite;
REVOKE ALL ON payroll FROM PUBLIC;
";

/// A running PostgreSQL server. Stops it and removes its files on drop.
pub struct Postgres {
    child: Child,
    bin: PathBuf,
    dir: PathBuf,
    /// Port on 127.0.0.1.
    pub port: u16,
    /// The superuser's password.
    pub password: String,
}

/// The newest `/usr/lib/postgresql/<version>/bin`.
fn bin_dir() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (apt-get install postgresql)")?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("postgres").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, b)| b)
        .context("no /usr/lib/postgresql/<version>/bin/postgres")
}

fn is_root() -> bool {
    run_ok(Command::new("id").arg("-u")).is_ok_and(|u| u.trim() == "0")
}

/// `bin` run as the `postgres` user when this process is root.
fn as_server_user(bin: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

impl Postgres {
    /// Initialises a cluster in a fresh directory and starts the server.
    pub fn start() -> Result<Self> {
        let bin = bin_dir()?;
        let dir = tempfile::Builder::new()
            .prefix("palisade-pg-")
            .tempdir_in("/tmp")?
            .keep();
        let password = format!("pg-{}", std::process::id());
        std::fs::write(dir.join("pwfile"), &password)?;
        if is_root() {
            run_ok(Command::new("chown").args(["-R", "postgres:"]).arg(&dir))?;
        }
        let data = dir.join("data");
        run_ok(
            as_server_user(&bin.join("initdb"))
                .arg("-D")
                .arg(&data)
                .args(["-U", SUPERUSER, "-A", "scram-sha-256", "--no-sync"])
                .arg(format!("--pwfile={}", dir.join("pwfile").display())),
        )
        .context("initdb")?;
        let port = free_port()?;
        let child = spawn_logged(
            as_server_user(&bin.join("postgres"))
                .arg("-D")
                .arg(&data)
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-k"])
                .arg(&dir)
                .args(["-c", "fsync=off", "-c", "full_page_writes=off"]),
            &dir.join("postgres.log"),
        )?;
        let mut pg = Postgres {
            child,
            bin,
            dir,
            port,
            password,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while pg
            .psql(SUPERUSER, &pg.password.clone(), "SELECT 1")
            .is_err()
        {
            if let Some(status) = pg.child.try_wait()? {
                bail!("postgres exited ({status}): {}", pg.log_tail());
            }
            if Instant::now() > deadline {
                bail!("postgres not ready: {}", pg.log_tail());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(pg)
    }

    /// Creates Vault's account (`VAULT_ADMIN`, password `vault_password`) and the platform's
    /// group roles and tables.
    pub fn prepare_for_vault(&self, vault_password: &str) -> Result<()> {
        self.psql(SUPERUSER, &self.password, PLATFORM_SQL)?;
        self.psql(
            SUPERUSER,
            &self.password,
            &format!(
                "CREATE ROLE {VAULT_ADMIN} LOGIN CREATEROLE PASSWORD '{vault_password}'; \
                 GRANT palisade_readonly, palisade_readwrite TO {VAULT_ADMIN} WITH ADMIN OPTION;"
            ),
        )?;
        Ok(())
    }

    /// Runs `sql` as `user` over TCP with a password; the rows, or the server's refusal.
    pub fn psql(&self, user: &str, password: &str, sql: &str) -> Result<String> {
        let out = run(Command::new(self.bin.join("psql"))
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "5")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", user])
            .args(["-d", "postgres", "-v", "ON_ERROR_STOP=1", "-tAc", sql]))?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Connection URL template for Vault's database plugin.
    pub fn vault_connection_url(&self) -> String {
        format!(
            "postgresql://{{{{username}}}}:{{{{password}}}}@127.0.0.1:{}/postgres?sslmode=disable",
            self.port
        )
    }

    /// Process id (of the launcher, for PostgreSQL under root).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        crate::tail_lines(&self.dir.join("postgres.log"), 15)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // runuser forwards the signal to the server it started.
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("pkill")
            .args([
                "-f",
                &format!("postgres -D {}", self.dir.join("data").display()),
            ])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
