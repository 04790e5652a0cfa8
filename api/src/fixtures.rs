//! The CEL fixtures in `api/tests/cel/`: one object per file, headed by
//! `# expect: accepted|rejected` and, for rejections, `# field:` and `# message:` lines.
//! Read by the client-side CEL tests and by the end-to-end tests that apply the same files to a
//! real API server.

use std::path::{Path, PathBuf};

/// One fixture.
#[derive(Clone, Debug)]
pub struct CelFixture {
    /// The file.
    pub path: PathBuf,
    /// The file name without extension (also the object's name).
    pub name: String,
    /// Whether the API server must accept the object.
    pub expect_ok: bool,
    /// The field path a rejection names.
    pub field: String,
    /// The message a rejection carries.
    pub message: String,
    /// The object.
    pub object: serde_json::Value,
}

/// Why the fixtures could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// A file could not be read.
    #[error("cannot read {0}: {1}")]
    Io(PathBuf, std::io::Error),
    /// A file is not a valid fixture.
    #[error("{0}: {1}")]
    Invalid(PathBuf, String),
}

/// The directory of the fixtures in this repository.
pub fn cel_fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cel")
}

/// Every fixture in `dir`, sorted by file name.
pub fn cel_fixtures(dir: &Path) -> Result<Vec<CelFixture>, FixtureError> {
    let io = |e| FixtureError::Io(dir.to_path_buf(), e);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io)?;
    paths.sort();
    let mut out = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(&path).map_err(|e| FixtureError::Io(path.clone(), e))?;
        let header = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
                .unwrap_or_default()
                .to_owned()
        };
        let expect = header("expect");
        if expect != "accepted" && expect != "rejected" {
            return Err(FixtureError::Invalid(
                path,
                "the header must say '# expect: accepted' or '# expect: rejected'".into(),
            ));
        }
        let object: serde_json::Value = serde_yaml::from_str(&text)
            .map_err(|e| FixtureError::Invalid(path.clone(), e.to_string()))?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push(CelFixture {
            expect_ok: expect == "accepted",
            field: header("field"),
            message: header("message"),
            object,
            name,
            path,
        });
    }
    Ok(out)
}
