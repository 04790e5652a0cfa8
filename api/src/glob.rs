//! Image globs: the patterns an ImagePolicy uses to say which images it covers.
//!
//! A glob is matched against an image reference without its tag or digest
//! (`registry.example.com/shop/orders`). Segments are separated by `/`; within a segment `*`
//! matches any run of characters other than `/`; a segment that is exactly `**` matches any
//! number of whole segments (zero or more). The same semantics are used by the webhook; the API
//! server enforces the syntax with [`IMAGE_GLOB_CEL`].

use std::{borrow::Cow, fmt, str::FromStr};

use schemars::{JsonSchema, json_schema};
use serde::{Deserialize, Serialize};

/// The CEL rule the API server applies to every image glob. Kept identical to
/// [`ImageGlob::from_str`]; a unit test checks both on the same corpus.
pub const IMAGE_GLOB_CEL: &str = r"self.matches('^(\\*\\*|[A-Za-z0-9._:-]*(\\*[A-Za-z0-9._:-]+)*\\*?)(/(\\*\\*|[A-Za-z0-9._:-]*(\\*[A-Za-z0-9._:-]+)*\\*?))*$') && !self.contains('//') && !self.startsWith('/') && !self.endsWith('/')";

/// A parsed image glob.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageGlob {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Segment {
    /// `**`: zero or more whole segments.
    AnyPath,
    /// Literal text and single `*` wildcards, split on `*`.
    Pattern(Vec<String>),
}

/// Why a glob was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image glob {glob:?}: {why}")]
pub struct ImageGlobError {
    glob: String,
    why: &'static str,
}

impl FromStr for ImageGlob {
    type Err = ImageGlobError;

    fn from_str(glob: &str) -> Result<Self, Self::Err> {
        let err = |why| ImageGlobError {
            glob: glob.to_owned(),
            why,
        };
        if glob.is_empty() {
            return Err(err("empty"));
        }
        let mut segments = Vec::new();
        for seg in glob.split('/') {
            if seg.is_empty() {
                return Err(err("empty path segment (leading, trailing or double '/')"));
            }
            if seg == "**" {
                segments.push(Segment::AnyPath);
                continue;
            }
            if seg.contains("**") {
                return Err(err(
                    "'**' must be a whole path segment, as in registry/team/**",
                ));
            }
            if !seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:-*".contains(&b))
            {
                return Err(err(
                    "only letters, digits, '.', '_', ':', '-', '/' and '*' are allowed",
                ));
            }
            segments.push(Segment::Pattern(
                seg.split('*').map(str::to_owned).collect(),
            ));
        }
        Ok(ImageGlob {
            text: glob.to_owned(),
            segments,
        })
    }
}

impl ImageGlob {
    /// Whether `image` (a reference without tag or digest) matches this glob.
    pub fn matches(&self, image: &str) -> bool {
        let parts: Vec<&str> = image.split('/').collect();
        match_segments(&self.segments, &parts)
    }

    /// The glob as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Matches path segments against glob segments in O(globs × parts) at worst: a `**` is a star
/// over whole segments, and on a mismatch only the most recent `**` is retried one segment
/// further (a later `**` can absorb anything an earlier one could), so no input is exponential
/// or polynomial in the number of `**`.
fn match_segments(globs: &[Segment], parts: &[&str]) -> bool {
    let (mut g, mut p) = (0, 0);
    // (glob index after the last `**`, part index it is retried from)
    let mut retry: Option<(usize, usize)> = None;
    while p < parts.len() {
        match globs.get(g) {
            Some(Segment::AnyPath) => {
                g += 1;
                retry = Some((g, p));
            }
            Some(Segment::Pattern(pieces)) if match_pattern(pieces, parts[p]) => {
                g += 1;
                p += 1;
            }
            _ => match retry {
                Some((after, from)) => {
                    g = after;
                    p = from + 1;
                    retry = Some((after, from + 1));
                }
                None => return false,
            },
        }
    }
    globs[g..].iter().all(|s| *s == Segment::AnyPath)
}

/// Matches one segment against literal pieces separated by `*` wildcards.
fn match_pattern(pieces: &[String], text: &str) -> bool {
    let Some((first, rest)) = pieces.split_first() else {
        return text.is_empty();
    };
    let Some(mut remaining) = text.strip_prefix(first.as_str()) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        return remaining.is_empty();
    };
    for piece in middle {
        match remaining.find(piece.as_str()) {
            Some(at) => remaining = &remaining[at + piece.len()..],
            None => return false,
        }
    }
    remaining.len() >= last.len() && remaining.ends_with(last.as_str())
}

impl TryFrom<String> for ImageGlob {
    type Error = ImageGlobError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ImageGlob> for String {
    fn from(g: ImageGlob) -> String {
        g.text
    }
}

impl fmt::Display for ImageGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl JsonSchema for ImageGlob {
    fn schema_name() -> Cow<'static, str> {
        "ImageGlob".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        json_schema!({
            "type": "string",
            "minLength": 1,
            "maxLength": 512,
            "x-kubernetes-validations": [{
                "rule": IMAGE_GLOB_CEL,
                "message": "must be an image glob such as registry.example.com/shop/** : \
                            '/'-separated segments of letters, digits, '.', '_', ':', '-', \
                            where '*' matches within a segment and a whole '**' segment \
                            matches any number of segments",
            }],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SYNTAX: &[(&str, bool)] = &[
        ("registry.example.com/shop/**", true),
        ("registry.example.com/shop/*", true),
        ("**", true),
        ("ghcr.io/org/app-*", true),
        ("ghcr.io/org/*-api", true),
        ("127.0.0.1:5000/shop/orders", true),
        ("docker.io/library/nginx", true),
        ("a*b*c", true),
        ("", false),
        ("/registry/x", false),
        ("registry/x/", false),
        ("registry//x", false),
        ("registry/***", false),
        ("registry/a**", false),
        ("registry/**b", false),
        ("registry/sh op", false),
        ("registry/x@sha256", false),
        ("registry/[ab]", false),
    ];

    #[test]
    fn parser_accepts_and_refuses() {
        for (glob, ok) in SYNTAX {
            assert_eq!(glob.parse::<ImageGlob>().is_ok(), *ok, "{glob}");
        }
    }

    #[test]
    fn cel_rule_agrees_with_parser() {
        use kube::core::cel::Validator;
        let schema = serde_json::to_value(schemars::schema_for!(ImageGlob)).expect("schema");
        for (glob, ok) in SYNTAX {
            if glob.is_empty() {
                continue; // refused by minLength, which the CEL validator does not evaluate
            }
            let result = Validator::new().validate(&schema, &serde_json::json!(glob), None);
            assert_eq!(result.is_ok(), *ok, "{glob}: {result:?}");
        }
    }

    #[test]
    fn matching() {
        let cases: &[(&str, &str, bool)] = &[
            (
                "registry.example.com/shop/**",
                "registry.example.com/shop/orders",
                true,
            ),
            (
                "registry.example.com/shop/**",
                "registry.example.com/shop/a/b/c",
                true,
            ),
            (
                "registry.example.com/shop/**",
                "registry.example.com/shop",
                true,
            ),
            (
                "registry.example.com/shop/**",
                "registry.example.com/shopping/x",
                false,
            ),
            (
                "registry.example.com/shop/*",
                "registry.example.com/shop/a/b",
                false,
            ),
            (
                "registry.example.com/shop/*",
                "registry.example.com/shop/orders",
                true,
            ),
            ("ghcr.io/org/app-*", "ghcr.io/org/app-web", true),
            ("ghcr.io/org/app-*", "ghcr.io/org/web-app", false),
            ("ghcr.io/org/*-api", "ghcr.io/org/orders-api", true),
            ("ghcr.io/org/*-api", "ghcr.io/org/-api", true),
            ("ghcr.io/org/*-api", "ghcr.io/org/api", false),
            ("a*b*c", "abc", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("ab*ba", "aba", false),
            ("**/orders", "r.io/x/y/orders", true),
            ("**/orders", "orders", true),
            ("**", "anything/at/all", true),
        ];
        for (glob, image, want) in cases {
            let g: ImageGlob = glob.parse().expect("valid glob");
            assert_eq!(g.matches(image), *want, "{glob} vs {image}");
        }
    }

    /// A glob as a regular expression: the obvious reading of the documented semantics, to
    /// check the linear matcher against.
    fn reference_regex(glob: &str) -> regex::Regex {
        // Matched against "/" + path: every segment consumes "/<segment>".
        let mut re = String::from("^");
        for seg in glob.split('/') {
            if seg == "**" {
                re.push_str("(?:/[^/]+)*");
            } else {
                let body: Vec<String> = seg.split('*').map(regex::escape).collect();
                re.push('/');
                re.push_str(&body.join("[^/]*"));
            }
        }
        re.push('$');
        regex::Regex::new(&re).expect("regex")
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(512), ..Default::default() })]

        /// The linear matcher agrees with the regular-expression reading on random globs and
        /// paths over a small alphabet (so that matches are frequent).
        #[test]
        fn matcher_agrees_with_the_reference(
            glob in proptest::collection::vec(
                proptest::prop_oneof!["\\*\\*", "[ab*]{1,4}"], 1..6),
            path in proptest::collection::vec("[ab]{1,3}", 1..7),
        ) {
            let glob = glob.join("/");
            let Ok(g) = glob.parse::<ImageGlob>() else { return Ok(()) };
            let path = path.join("/");
            let want = reference_regex(&glob).is_match(&format!("/{path}"));
            proptest::prop_assert_eq!(g.matches(&path), want, "{} vs {}", glob, path);
        }
    }

    /// Many `**` against a long path that almost matches: linear, not exponential.
    #[test]
    fn many_double_stars_are_cheap() {
        let glob: ImageGlob = format!("{}/c", ["**/a"; 30].join("/"))
            .parse()
            .expect("glob");
        let path = ["a"; 200].join("/");
        let started = std::time::Instant::now();
        assert!(!glob.matches(&path));
        assert!(glob.matches(&format!("{path}/c")));
        assert!(
            started.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }
}
