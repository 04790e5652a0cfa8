//! Image references in one canonical form, so that a policy covers an image however it is
//! spelled: `REGISTRY.example.com:443/shop/orders:1`, `registry.example.com/shop/orders:1` and
//! `registry.example.com/shop/orders@sha256:…` are the same repository, as are `nginx`,
//! `docker.io/nginx`, `index.docker.io/library/nginx` and `registry-1.docker.io/library/nginx`.
//!
//! A reference is parsed with the distribution grammar (the one the container runtime uses); one
//! that does not parse is refused, never matched by a fallback. The canonical repository is
//! `host/path` with the host lower-cased, a default port (`:443`, `:80`) removed, Docker Hub's
//! aliases folded into `docker.io` and its implicit `library/` made explicit. Image globs are
//! rewritten by the same rules ([`canonical_glob`]), so both sides of a match agree.

use oci_client::Reference;
use palisade_api::glob::ImageGlob;

/// Docker Hub's canonical name.
const DOCKER_HUB: &str = "docker.io";

/// Host names that all mean Docker Hub.
const DOCKER_HUB_ALIASES: &[&str] = &[
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
];

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRef {
    /// The reference as the registry client uses it (host as written).
    pub reference: Reference,
    /// Canonical registry host (`docker.io`, `registry.example.com`, `127.0.0.1:5000`).
    pub host: String,
    /// Canonical repository: `host/path` (`docker.io/library/nginx`).
    pub repository: String,
    /// The digest it names, if any (`sha256:…`).
    pub digest: Option<String>,
}

/// Why a reference was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("image reference {image:?} does not parse: {why}")]
pub struct BadReference {
    /// The reference as written (truncated when very long).
    pub image: String,
    /// Why.
    pub why: String,
}

/// Parses `image` into its canonical form.
pub fn parse(image: &str) -> Result<ImageRef, BadReference> {
    let bad = |why: String| BadReference {
        image: image.chars().take(256).collect(),
        why,
    };
    if image.len() > 4096 {
        return Err(bad("longer than 4096 bytes".into()));
    }
    if image.trim() != image || image.is_empty() {
        return Err(bad("empty, or surrounded by whitespace".into()));
    }
    let (rest, digest) = match image.split_once('@') {
        Some((rest, digest)) => {
            valid_digest(digest).map_err(|why| bad(why.to_owned()))?;
            (rest, Some(digest))
        }
        None => (image, None),
    };
    let name = name_of(rest);
    let tag = rest
        .get(name.len() + 1..)
        .filter(|_| rest.len() > name.len());
    if let Some(t) = tag {
        valid_tag(t).map_err(|why| bad(why.to_owned()))?;
    }
    let (written_host, path) = split_domain(name);
    if written_host != DOCKER_HUB || name.starts_with(DOCKER_HUB) {
        valid_domain(written_host).map_err(|why| bad(why.to_owned()))?;
    }
    valid_path(path).map_err(|why| bad(why.to_owned()))?;
    if path.len() > 255 {
        return Err(bad("repository name longer than 255 characters".into()));
    }
    let host = canonical_host(written_host);
    let path = if host == DOCKER_HUB && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_owned()
    };
    // The registry client's reference: Docker Hub's names as it expects them.
    let (client_host, client_path) = if canonical_host(written_host) == DOCKER_HUB {
        (DOCKER_HUB.to_owned(), path.clone())
    } else {
        (written_host.to_owned(), path.clone())
    };
    let reference = match digest {
        Some(d) => {
            let mut r = Reference::with_digest(client_host, client_path, d.to_owned());
            if let Some(t) = tag {
                r = Reference::with_tag(
                    r.registry().to_owned(),
                    r.repository().to_owned(),
                    t.to_owned(),
                )
                .clone_with_digest(d.to_owned());
            }
            r
        }
        None => Reference::with_tag(client_host, client_path, tag.unwrap_or("latest").to_owned()),
    };
    Ok(ImageRef {
        digest: digest.map(str::to_owned),
        reference,
        repository: format!("{host}/{path}"),
        host,
    })
}

/// `algorithm:hex` with a supported algorithm and the right length of lower-case hex.
fn valid_digest(digest: &str) -> Result<(), &'static str> {
    let (algorithm, hex) = digest
        .split_once(':')
        .ok_or("digest without an algorithm")?;
    let len = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return Err("unsupported digest algorithm"),
    };
    if hex.len() != len
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err("digest of the wrong length or not lower-case hexadecimal");
    }
    Ok(())
}

/// `[\w][\w.-]{0,127}` (ASCII).
fn valid_tag(tag: &str) -> Result<(), &'static str> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let ok = tag.len() <= 128
        && tag.bytes().next().is_some_and(word)
        && tag.bytes().all(|b| word(b) || b == b'.' || b == b'-');
    if ok { Ok(()) } else { Err("invalid tag") }
}

/// Domain components (`[a-zA-Z0-9]` with inner `-`) separated by `.`, and an optional port.
fn valid_domain(domain: &str) -> Result<(), &'static str> {
    let (name, port) = match domain.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (domain, None),
    };
    if let Some(p) = port
        && (p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("invalid registry port");
    }
    let component = |c: &str| {
        !c.is_empty()
            && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !c.starts_with('-')
            && !c.ends_with('-')
    };
    if name.split('.').all(component) {
        Ok(())
    } else {
        Err("invalid registry host")
    }
}

/// Path components `[a-z0-9]+` joined inside by `.`, `_`, `__` or runs of `-`, separated by `/`.
fn valid_path(path: &str) -> Result<(), &'static str> {
    let component = |c: &str| {
        let bytes = c.as_bytes();
        let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
            return false;
        }
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            if alnum(b) {
                i += 1;
                continue;
            }
            // A separator: `.`, `_`, `__` or one or more `-`, between alphanumerics.
            let start = i;
            match b {
                b'.' => i += 1,
                b'_' => {
                    i += if bytes.get(i + 1) == Some(&b'_') {
                        2
                    } else {
                        1
                    }
                }
                b'-' => {
                    while bytes.get(i) == Some(&b'-') {
                        i += 1;
                    }
                }
                _ => return false,
            }
            if i == start || !bytes.get(i).is_some_and(|&n| alnum(n)) {
                return false;
            }
        }
        true
    };
    if path.split('/').all(component) {
        Ok(())
    } else {
        Err(
            "repository path must be lower-case letters and digits, joined by '.', '_', '__' or '-'",
        )
    }
}

/// The name part of a reference: without `@digest` and without `:tag` (a `:` after the last
/// `/`; one before it belongs to a port).
fn name_of(image: &str) -> &str {
    let without_digest = image.split('@').next().unwrap_or(image);
    match without_digest.rfind(':') {
        Some(i) if !without_digest[i..].contains('/') => &without_digest[..i],
        _ => without_digest,
    }
}

/// Splits a name into (domain, path) as distribution does: the first component is a domain
/// when it has a `.` or a `:`, is `localhost`, or has an upper-case letter (which a path
/// component cannot); otherwise the domain is Docker Hub.
fn split_domain(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (first, rest)
        }
        _ => (DOCKER_HUB, name),
    }
}

/// A registry host in canonical form: lower-cased, without a default port, Docker Hub's
/// aliases folded.
pub fn canonical_host(host: &str) -> String {
    let lower = host.to_ascii_lowercase();
    // The port, read as the runtime reads it: a number (`:0443` is 443).
    let (name, port) = match lower.rsplit_once(':') {
        Some((name, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!name.starts_with('[') || name.ends_with(']')) =>
        {
            let digits = port.trim_start_matches('0');
            (name, Some(if digits.is_empty() { "0" } else { digits }))
        }
        _ => (lower.as_str(), None),
    };
    let bare = match port {
        None | Some("443" | "80") => name.to_owned(),
        Some(p) => format!("{name}:{p}"),
    };
    if DOCKER_HUB_ALIASES.contains(&bare.as_str()) {
        DOCKER_HUB.to_owned()
    } else {
        bare
    }
}

/// An image glob rewritten by the rules references are canonicalised with, as the set of
/// canonical globs that together cover every reference the glob covers as written: a host
/// segment lower-cased with a literal default port removed; a wildcard port also without the
/// port (`*` can be `443`); a host pattern that could be one of Docker Hub's aliases also as
/// `docker.io`; a first segment that could be a host or a Docker Hub namespace (`team*`) read
/// both ways; a glob without a host as a Docker Hub glob (`nginx` → `docker.io/library/nginx`,
/// `team/*` → `docker.io/team/*`). A glob that starts with `**` matches any host already.
pub fn canonical_glob(glob: &ImageGlob) -> Vec<ImageGlob> {
    let text = glob.as_str();
    let segments: Vec<&str> = text.split('/').collect();
    let Some((first, rest)) = segments.split_first() else {
        return vec![glob.clone()];
    };
    if *first == "**" {
        return vec![glob.clone()];
    }
    let mut out: Vec<String> = Vec::new();
    let hub_path = |path: &[&str]| -> Vec<String> {
        let mut v = vec![format!("{DOCKER_HUB}/{}", path.join("/"))];
        if path.len() == 1 && path[0] != "**" {
            v.push(format!("{DOCKER_HUB}/library/{}", path[0]));
        }
        v
    };
    let could_be_host = !rest.is_empty()
        && (first.contains(['.', ':', '*'])
            || first.eq_ignore_ascii_case("localhost")
            || first.chars().any(|c| c.is_ascii_uppercase()));
    let could_be_hub_namespace = !first.contains(['.', ':'])
        && !first.eq_ignore_ascii_case("localhost")
        && !first.chars().any(|c| c.is_ascii_uppercase());
    if could_be_host {
        let host = canonical_host(first);
        let mut hosts = vec![host.clone()];
        // `host:*` also covers the reference whose default port was dropped.
        if let Some((name, port)) = host.rsplit_once(':')
            && port.contains('*')
        {
            hosts.push(name.to_owned());
        }
        // A host pattern one of Docker Hub's names fits covers Docker Hub.
        if let Ok(h) = first.to_ascii_lowercase().parse::<ImageGlob>()
            && DOCKER_HUB_ALIASES
                .iter()
                .any(|a| h.matches(a) || h.matches(&format!("{a}:443")))
        {
            hosts.push(DOCKER_HUB.to_owned());
        }
        for h in hosts {
            if h == DOCKER_HUB {
                out.extend(hub_path(rest));
            } else {
                out.push(format!("{h}/{}", rest.join("/")));
            }
        }
    }
    if could_be_hub_namespace {
        out.extend(hub_path(&segments));
    }
    let mut globs: Vec<ImageGlob> = out.iter().filter_map(|g| g.parse().ok()).collect();
    globs.dedup();
    if globs.is_empty() {
        globs.push(glob.clone());
    }
    globs
}

/// Whether any canonical form of `glob` matches the canonical `repository`.
pub fn glob_covers(glob: &ImageGlob, repository: &str) -> bool {
    canonical_glob(glob).iter().any(|g| g.matches(repository))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn spellings_of_one_image_have_one_repository() {
        let same = [
            (
                "registry.example.com/shop/orders",
                &[
                    "registry.example.com/shop/orders:1",
                    "registry.example.com:443/shop/orders:1",
                    "REGISTRY.Example.com/shop/orders",
                    "Registry.example.com:443/shop/orders@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                    "registry.example.com:80/shop/orders:v2",
                    "registry.example.com:0443/shop/orders:1",
                    "registry.example.com:00080/shop/orders:1",
                ][..],
            ),
            (
                "docker.io/library/nginx",
                &[
                    "nginx",
                    "nginx:1.27",
                    "docker.io/nginx",
                    "docker.io/library/nginx",
                    "index.docker.io/library/nginx",
                    "index.docker.io/nginx:latest",
                    "registry-1.docker.io/library/nginx",
                    "DOCKER.IO/nginx",
                    "docker.io:443/library/nginx",
                ][..],
            ),
            (
                "docker.io/team/app",
                &["team/app", "index.docker.io/team/app:x"][..],
            ),
            (
                "127.0.0.1:5000/shop/a",
                &["127.0.0.1:5000/shop/a:1", "127.0.0.1:05000/shop/a:1"][..],
            ),
            (
                "docker.io/library/nginx",
                &["registry-1.docker.io:0443/library/nginx"][..],
            ),
            ("localhost/a", &["localhost/a", "LOCALHOST/a"][..]),
        ];
        for (repo, spellings) in same {
            for s in spellings {
                assert_eq!(parse(s).map(|r| r.repository).as_deref(), Ok(repo), "{s}");
            }
        }
        assert_eq!(
            parse(&format!("r.io/a@{DIGEST}")).map(|r| r.digest),
            Ok(Some(DIGEST.to_owned()))
        );
    }

    #[test]
    fn references_that_do_not_parse_are_refused() {
        for bad in [
            "",
            " nginx",
            "nginx ",
            "registry.example.com/Shop/orders",
            "registry.example.com/shop/orders@sha256:abc",
            "registry.example.com/shop/orders@md5:0123",
            "registry.example.com//orders",
            "http://registry.example.com/orders",
            "a:b:c",
            "registry.example.com/shop/orders:",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn globs_are_rewritten_like_references() {
        let cases: &[(&str, &[&str])] = &[
            (
                "REGISTRY.example.com:443/shop/**",
                &["registry.example.com/shop/**"],
            ),
            (
                "index.docker.io/library/nginx",
                &["docker.io/library/nginx"],
            ),
            ("docker.io/nginx", &["docker.io/library/nginx"]),
            ("nginx", &["docker.io/library/nginx"]),
            ("team/*", &["docker.io/team/*"]),
            ("docker.io/**", &["docker.io/**"]),
            ("**", &["**"]),
            ("127.0.0.1:5000/**", &["127.0.0.1:5000/**"]),
            ("127.0.0.1:05000/**", &["127.0.0.1:5000/**"]),
            // Wildcards that could mean several things are read every way.
            (
                "registry.example.com:*/x",
                &["registry.example.com:*/x", "registry.example.com/x"],
            ),
            ("127*/shop/**", &["127*/shop/**", "docker.io/127*/shop/**"]),
            ("*.docker.io/**", &["*.docker.io/**", "docker.io/**"]),
            ("*/nginx", &["*/nginx", "docker.io/library/nginx"]),
        ];
        for (glob, want) in cases {
            let g: ImageGlob = glob.parse().expect("glob");
            let got: Vec<String> = canonical_glob(&g)
                .iter()
                .map(|g| g.as_str().to_owned())
                .collect();
            for w in *want {
                assert!(got.iter().any(|g| g == w), "{glob}: {got:?} lacks {w}");
            }
        }
        // And they cover what they cover as written.
        let covered = [
            ("127.0.0.1:*/shop/**", "127.0.0.1:443/shop/orders:1"),
            ("127*/shop/**", "127.0.0.1/shop/orders:1"),
            ("*.docker.io/**", "registry-1.docker.io/team/app"),
            ("*/nginx", "docker.io/nginx"),
        ];
        for (glob, image) in covered {
            let g: ImageGlob = glob.parse().expect("glob");
            let r = parse(image).expect("image");
            assert!(glob_covers(&g, &r.repository), "{glob} misses {image}");
        }
    }

    fn case_mix(s: &str, mask: u64) -> String {
        s.chars()
            .enumerate()
            .map(|(i, c)| {
                if mask >> (i % 64) & 1 == 1 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256), ..ProptestConfig::default() })]

        /// The parser accepts exactly what the distribution grammar (oci-spec's regular
        /// expression) accepts, on ASCII input.
        #[test]
        fn parser_agrees_with_the_grammar(
            text in "[aZ0.:/_-]{1,24}",
            digest in prop::option::of(prop::sample::select(vec![
                "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                "sha256:0123",
                "md5:0123456789abcdef0123456789abcdef",
            ])),
        ) {
            let image = match digest {
                Some(d) => format!("{text}@{d}"),
                None => text,
            };
            let ours = parse(&image).is_ok();
            let grammar = image.parse::<Reference>().is_ok();
            prop_assert_eq!(ours, grammar, "{}", image);
        }

        /// Any spelling of one image (host case, default port, Docker Hub alias, implicit
        /// `library/`, tag or digest) is covered by exactly the same globs.
        #[test]
        fn any_spelling_gets_the_same_policies(
            host in prop::sample::select(vec!["registry.example.com", "ghcr.io", "docker.io", "127.0.0.1:5000"]),
            path in prop::collection::vec("[a-z][a-z0-9]{0,6}", 1..4),
            mask in any::<u64>(),
            port in any::<bool>(),
            alias in prop::sample::select(DOCKER_HUB_ALIASES.to_vec()),
            tag in prop::option::of("[a-zA-Z0-9][a-zA-Z0-9._-]{0,8}"),
        ) {
            let path = path.join("/");
            let plain = format!("{host}/{path}");
            let spelled_host = if host == "docker.io" { alias.to_owned() } else { host.to_owned() };
            let mut spelled = case_mix(&spelled_host, mask);
            if port && !spelled.contains(':') {
                spelled.push_str(":443");
            }
            let mut spelled = format!("{spelled}/{path}");
            if let Some(t) = &tag {
                spelled = format!("{spelled}:{t}");
            }
            let a = parse(&plain).expect("plain parses");
            let b = parse(&spelled).expect("spelling parses");
            prop_assert_eq!(&a.repository, &b.repository);
            let globs = ["registry.example.com/**", "docker.io/library/*", "ghcr.io/*/**",
                         "nginx", "*/a*/**", "REGISTRY.EXAMPLE.COM:443/**", "index.docker.io/**"];
            for g in globs {
                let g: ImageGlob = g.parse().expect("glob");
                prop_assert_eq!(glob_covers(&g, &a.repository), glob_covers(&g, &b.repository), "{}", g);
            }
        }
    }
}
