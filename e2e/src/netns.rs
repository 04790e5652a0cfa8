//! A private network and mount namespace for a real node: one holder process made with
//! `unshare --net --mount --propagation private`, in which the node's processes run (entered
//! with `nsenter`), so the bridge, routes, iptables rules, mounts and the kernel settings the
//! kubelet writes stay inside and vanish with it.
//!
//! Inside, the node has the address [`NODE_IP`] on a veth interface (the default route), its
//! own loopback, and tmpfs over `/run`, `/var/lib` and `/var/log`; the VM-wide settings the
//! kubelet writes (`vm.overcommit_memory`, `kernel.panic`, ...) are plain files bind-mounted
//! over their `/proc/sys` entries. The host reaches a server inside through a [`Relay`] that
//! listens on the host's 127.0.0.1, and the node reaches a host server (on 127.0.0.1) through
//! one that listens inside: nothing listens on a host address other than 127.0.0.1.

use std::{
    fmt::Write as _,
    fs::File,
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// The node's address inside its namespace.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);

/// Kernel settings the kubelet writes that are not per network namespace: each gets a plain
/// file bind-mounted over it inside, so the host's values never change.
pub const MASKED_SYSCTLS: &[&str] = &[
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// The process holding the namespaces. Killed (and the namespaces with it) on drop.
#[derive(Debug)]
pub struct Holder {
    child: Child,
    /// Its process id (`nsenter --target`).
    pub pid: u32,
    net: Arc<File>,
    log: PathBuf,
}

impl Holder {
    /// Makes the namespaces and sets them up; `dir` receives the setup log and the masked
    /// sysctl files. Fails with the setup's own output (a missing kernel feature, `ip` or
    /// `unshare` absent).
    pub fn start(dir: &Path) -> Result<Self> {
        for tool in ["unshare", "nsenter", "ip", "mount"] {
            if which(tool).is_none() {
                bail!("{tool} not found on PATH: the node needs util-linux and iproute2");
            }
        }
        let masks = dir.join("sysctl");
        std::fs::create_dir_all(&masks)?;
        let ready = dir.join("namespaces-ready");
        let _ = std::fs::remove_file(&ready);
        let mut script = String::from("set -eu\n");
        script.push_str("ip link set lo up\n");
        // (No dummy device in this kernel: one end of a veth pair whose peer stays inside.)
        script.push_str(
            "ip link add node0 type veth peer name node0-peer\nip link set node0-peer up\n",
        );
        let _ = writeln!(script, "ip addr add {NODE_IP}/32 dev node0");
        script.push_str("ip link set node0 up\n");
        // Service IPs must be routable before kube-proxy's rules rewrite them.
        script.push_str("ip route add default dev node0\n");
        script.push_str("echo 1 > /proc/sys/net/ipv4/ip_forward\n");
        // Pod-to-Service traffic between pods on the same bridge goes through iptables.
        script.push_str(
            "if [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]; then echo 1 > /proc/sys/net/bridge/bridge-nf-call-iptables; fi\n",
        );
        for d in ["/run", "/var/lib", "/var/log"] {
            let _ = writeln!(script, "mount -t tmpfs -o mode=0755 palisade-node {d}");
        }
        for s in MASKED_SYSCTLS {
            let file = masks.join(s.replace('/', "."));
            let _ = writeln!(
                script,
                "cat /proc/sys/{s} > {f}; mount --bind {f} /proc/sys/{s}",
                f = file.display()
            );
        }
        let _ = write!(script, "touch {}\nexec sleep infinity\n", ready.display());
        let log = dir.join("namespaces.log");
        let child = crate::spawn_logged(
            Command::new("unshare")
                .args(["--net", "--mount", "--propagation", "private", "--"])
                .args(["bash", "-c", &script]),
            &log,
        )?;
        let pid = child.id();
        let mut holder = Holder {
            child,
            pid,
            net: Arc::new(File::open("/dev/null")?),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.exists() {
            if let Some(status) = holder.child.try_wait()? {
                bail!(
                    "setting up the node's namespaces failed ({status}):\n{}",
                    crate::tail_lines(&holder.log, 20)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the node's namespaces were not ready after 20 s:\n{}",
                    crate::tail_lines(&holder.log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        holder.net = Arc::new(
            File::open(format!("/proc/{pid}/ns/net")).context("opening the node's netns")?,
        );
        Ok(holder)
    }

    /// A command that runs `program` inside the namespaces.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["--target", &self.pid.to_string(), "--net", "--mount", "--"])
            .arg(program);
        cmd
    }

    /// The inode of the holder's mount namespace (to find every process inside).
    pub fn mount_ns(&self) -> Option<u64> {
        ns_inode(self.pid, "mnt")
    }

    /// A TCP connection to `addr` as seen from inside (a pod IP, a Service IP, the node).
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
        let net = Arc::clone(&self.net);
        std::thread::scope(|s| {
            s.spawn(move || {
                enter(&net)?;
                TcpStream::connect_timeout(&addr, timeout)
                    .with_context(|| format!("connecting to {addr} inside the node"))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("connector thread panicked"))?
        })
    }

    /// Listens on the host's 127.0.0.1 (a free port) and carries every connection to `target`
    /// inside.
    pub fn forward(&self, target: SocketAddr) -> Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let (tx, rx) = mpsc::channel::<mpsc::Sender<std::io::Result<TcpStream>>>();
        let net = Arc::clone(&self.net);
        // One thread lives in the node's netns and opens the inside connections.
        std::thread::spawn(move || {
            if enter(&net).is_err() {
                return;
            }
            for reply in rx {
                let _ = reply.send(TcpStream::connect_timeout(&target, Duration::from_secs(5)));
            }
        });
        Relay::run(listener, move || {
            let (rtx, rrx) = mpsc::channel();
            tx.send(rtx).map_err(std::io::Error::other)?;
            rrx.recv().map_err(std::io::Error::other)?
        })
    }

    /// Listens on `inside` (an address of the node) and carries every connection to `target`
    /// on the host (127.0.0.1).
    pub fn expose(&self, inside: SocketAddr, target: SocketAddr) -> Result<Relay> {
        let net = Arc::clone(&self.net);
        let listener = std::thread::scope(|s| {
            s.spawn(move || {
                enter(&net)?;
                TcpListener::bind(inside).with_context(|| format!("listening on {inside} inside"))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("listener thread panicked"))?
        })?;
        Relay::run(listener, move || {
            TcpStream::connect_timeout(&target, Duration::from_secs(5))
        })
    }

    /// Runs `script` with bash inside; its output, or an error with it.
    pub fn sh(&self, script: &str) -> Result<String> {
        crate::run_ok(self.command("bash").args(["-c", script]))
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Moves the calling thread into the network namespace `net` (per thread: the rest of the
/// process stays where it is).
fn enter(net: &File) -> Result<()> {
    use std::os::fd::AsFd as _;
    rustix::thread::move_into_link_name_space(
        net.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .context("setns into the node's netns")
}

/// The inode of `/proc/<pid>/ns/<kind>`.
pub fn ns_inode(pid: u32, kind: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(format!("/proc/{pid}/ns/{kind}"))
        .ok()
        .map(|m| m.ino())
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
}

/// A TCP relay between the two sides; it stops accepting on drop (open connections end when
/// either side closes).
pub struct Relay {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Relay {
    fn run(
        listener: TcpListener,
        dial: impl Fn() -> std::io::Result<TcpStream> + Send + 'static,
    ) -> Result<Relay> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        // Polled, so the loop ends (and the socket closes) when the relay is dropped: a socket
        // left open inside would keep the node's network namespace alive.
        listener.set_nonblocking(true)?;
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let _ = client.set_nonblocking(false);
                        match dial() {
                            Ok(server) => splice(client, server),
                            Err(_) => {
                                let _ = client.shutdown(Shutdown::Both);
                            }
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Relay { addr, stop })
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copies both ways between `a` and `b` on two threads, closing each direction when its source
/// ends.
fn splice(a: TcpStream, b: TcpStream) {
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
            let _ = from.shutdown(Shutdown::Read);
        });
    };
    pipe(a, b2);
    pipe(b, a2);
}
