//! Writes every Palisade CRD into the directory given as the only argument (default `crds`);
//! with `--docs`, writes the field tables of the reference pages (`docs/reference/*.md`, run
//! from the repository root) instead.

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let arg = std::env::args().nth(1);
    if arg.as_deref() == Some("--docs") {
        return docs();
    }
    let dir = PathBuf::from(arg.unwrap_or_else(|| "crds".into()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("crdgen: cannot create {}: {e}", dir.display());
        return ExitCode::FAILURE;
    }
    for (file, crd) in palisade_api::crdgen::all() {
        let path = dir.join(file);
        let written = palisade_api::crdgen::render(&crd)
            .map_err(|e| e.to_string())
            .and_then(|yaml| std::fs::write(&path, yaml).map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!("crdgen: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}

fn docs() -> ExitCode {
    use palisade_api::crddoc;
    for (_, crd) in palisade_api::crdgen::all() {
        let path = PathBuf::from(crddoc::page(&crd));
        let written = std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                crddoc::replace_between(&text, &crddoc::fields(&crd))
                    .ok_or_else(|| format!("no markers ({} ... {})", crddoc::BEGIN, crddoc::END))
            })
            .and_then(|text| std::fs::write(&path, text).map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!("crdgen: {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {}", path.display());
    }
    ExitCode::SUCCESS
}
