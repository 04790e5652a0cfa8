//! A hostile OCI registry on 127.0.0.1: each repository misbehaves in its own way, so the
//! webhook can be shown to refuse every image it serves, in time, without echoing what it
//! wrote and without its memory growing with what it is sent. Every behaviour is bounded (the
//! endless body stops after 1 GiB or when the client hangs up; the slow answer after 20 s).
//!
//! | repository | behaviour |
//! |---|---|
//! | `endless/app` | 200 with no length, 1 MiB chunks until the client gives up |
//! | `huge/app` | 200 declaring a 10 GiB body |
//! | `liar/app` | a small manifest with a `Docker-Content-Digest` of other content |
//! | `loopback/app` | 302 to another port on 127.0.0.1 |
//! | `metadata/app` | 302 to 169.254.169.254 (a cloud metadata address) |
//! | `slow/app` | answers nothing for 20 s |
//! | `chatty/app` | 403 with a body holding [`SECRET`] |
//! | `fat/app` | a signature manifest listing 64 layers of 4 MiB (all the same blob) |
//! | `stall/app` | a signature layer that never comes (20 s); [`HostileRegistry::stalled`] counts the clients still waiting for one |

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Result;

/// What the `chatty` repository writes in its error body; it must never reach a denial.
pub const SECRET: &str = "hostile-registry-says-s3cr3t-token-0xdeadbeef";

/// The repositories and what each must be refused with.
pub const BEHAVIOURS: &[(&str, &str)] = &[
    ("endless", "bytes allowed"),
    ("huge", "declares a body"),
    ("liar", "Docker-Content-Digest"),
    ("loopback", "redirect"),
    ("metadata", "redirect"),
    ("slow", "did not answer within"),
    ("chatty", "HTTP 403"),
    ("fat", "signature material is larger than"),
    ("stall", "did not answer within"),
];

/// The running hostile registry.
pub struct HostileRegistry {
    /// `127.0.0.1:<port>`.
    pub host: String,
    stop: Arc<AtomicBool>,
    /// Bytes written to clients so far.
    pub bytes_sent: Arc<AtomicU64>,
    /// Connections of `stall/app` whose client has not hung up yet.
    pub stalled: Arc<AtomicU64>,
}

impl HostileRegistry {
    /// Starts it on a free port.
    pub fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let host = listener.local_addr()?.to_string();
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let bytes_sent = Arc::new(AtomicU64::new(0));
        let stalled = Arc::new(AtomicU64::new(0));
        let (s, sent, st) = (
            Arc::clone(&stop),
            Arc::clone(&bytes_sent),
            Arc::clone(&stalled),
        );
        std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (s, sent, st) = (Arc::clone(&s), Arc::clone(&sent), Arc::clone(&st));
                        std::thread::spawn(move || {
                            let _ = serve(conn, &s, &sent, &st);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(HostileRegistry {
            host,
            stop,
            bytes_sent,
            stalled,
        })
    }

    /// The webhook configuration that lets it speak plain HTTP to this registry.
    pub fn webhook_config(&self) -> String {
        format!("images: {{insecureRegistries: [\"{}\"]}}", self.host)
    }
}

impl Drop for HostileRegistry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(conn: TcpStream, stop: &AtomicBool, sent: &AtomicU64, stalled: &AtomicU64) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
        // Headers, up to the blank line.
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                break;
            }
        }
        let repo = path
            .strip_prefix("/v2/")
            .and_then(|p| p.split('/').next())
            .unwrap_or_default();
        let write = |out: &mut TcpStream, bytes: &[u8]| -> Result<()> {
            out.write_all(bytes)?;
            sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            Ok(())
        };
        match repo {
            "endless" => {
                write(
                    &mut out,
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\nconnection: close\r\n\r\n",
                )?;
                let chunk = vec![b' '; 1 << 20];
                for _ in 0..1024 {
                    if stop.load(Ordering::Relaxed) || write(&mut out, &chunk).is_err() {
                        break;
                    }
                }
                return Ok(());
            }
            "huge" => {
                write(
                    &mut out,
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\ncontent-length: 10737418240\r\nconnection: close\r\n\r\n{",
                )?;
                return Ok(());
            }
            "liar" => {
                let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/vnd.oci.image.manifest.v1+json\r\ndocker-content-digest: sha256:{}\r\ncontent-length: {}\r\n\r\n",
                    "0".repeat(64),
                    body.len()
                );
                write(&mut out, head.as_bytes())?;
                write(&mut out, body)?;
            }
            "loopback" | "metadata" => {
                let target = if repo == "loopback" {
                    "https://127.0.0.1:1/v2/x/manifests/v1"
                } else {
                    "https://169.254.169.254/latest/meta-data/"
                };
                let head = format!(
                    "HTTP/1.1 302 Found\r\nlocation: {target}\r\ncontent-length: 0\r\n\r\n"
                );
                write(&mut out, head.as_bytes())?;
            }
            "fat" | "stall" => {
                let rest = path.splitn(5, '/').nth(4).unwrap_or_default();
                if rest.starts_with("blobs/") && repo == "stall" {
                    stall(&out, stop, stalled);
                    return Ok(());
                }
                let (head, body) = signed_answer(repo, rest);
                write(&mut out, head.as_bytes())?;
                write(&mut out, &body)?;
            }
            "slow" => {
                for _ in 0..200 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                return Ok(());
            }
            _ => {
                let body = format!(
                    r#"{{"errors":[{{"code":"DENIED","message":"{SECRET}","detail":"{SECRET}"}}]}} {SECRET}"#
                );
                let head = format!(
                    "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    body.len()
                );
                write(&mut out, head.as_bytes())?;
                write(&mut out, body.as_bytes())?;
            }
        }
    }
}

/// The head and body of the answer to `rest` in repository `repo` (see [`signed_material`]).
fn signed_answer(repo: &str, rest: &str) -> (String, Vec<u8>) {
    let (kind, body) = signed_material(repo, rest);
    let head = if body.is_empty() {
        "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_owned()
    } else {
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
    };
    (head, body)
}

/// The image manifest, signature manifest or blob `rest` (`manifests/...` or `blobs/...`) names
/// in repository `repo` (`fat` or `stall`), with its media type; empty when there is none.
fn signed_material(repo: &str, rest: &str) -> (&'static str, Vec<u8>) {
    const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    let big = vec![b'x'; 4 << 20];
    let small = b"{}".to_vec();
    let blob = if repo == "fat" { &big } else { &small };
    let blob_digest = format!("sha256:{}", crate::sbom::sha256_hex(blob));
    if let Some(digest) = rest.strip_prefix("blobs/") {
        return if digest == blob_digest {
            ("application/octet-stream", blob.clone())
        } else {
            ("", Vec::new())
        };
    }
    let Some(reference) = rest.strip_prefix("manifests/") else {
        return ("", Vec::new());
    };
    if reference == "v1" || reference.starts_with("sha256:") {
        let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2},"layers":[]}"#;
        return (MANIFEST, body.to_vec());
    }
    if reference.starts_with("sha256-") {
        let count = if repo == "fat" { 64 } else { 1 };
        let layer = format!(
            r#"{{"mediaType":"application/vnd.dev.cosign.simplesigning.v1+json","digest":"{blob_digest}","size":{},"annotations":{{"dev.cosignproject.cosign/signature":"AAAA"}}}}"#,
            blob.len()
        );
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","size":2}},"layers":[{}]}}"#,
            vec![layer; count].join(",")
        );
        return (MANIFEST, body.into_bytes());
    }
    ("", Vec::new())
}

/// Holds a request for a blob unanswered for up to 20 s, counted in `stalled` until the client
/// hangs up (or the 20 s pass).
fn stall(conn: &TcpStream, stop: &AtomicBool, stalled: &AtomicU64) {
    use std::io::Read as _;
    stalled.fetch_add(1, Ordering::SeqCst);
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let mut probe = [0u8; 64];
    for _ in 0..200 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        match (&*conn).read(&mut probe) {
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            _ => break,
        }
    }
    stalled.fetch_sub(1, Ordering::SeqCst);
}
