//! Finding NCCL's shared library. cudarc looks for `libnccl.so` and a few versioned
//! names, but the `nvidia-nccl-cu12`/`-cu13` wheels and most system packages ship only
//! `libnccl.so.2`; so the library is looked for here, in order:
//!
//! 1. `XTUNER_NCCL`: the library file itself, or a folder holding it;
//! 2. `NCCL_HOME` (and `NCCL_ROOT`): `lib/`, `lib64/` or the folder itself;
//! 3. the folders of `LD_LIBRARY_PATH`;
//! 4. the CUDA toolkit (`CUDA_PATH`, `CUDA_HOME`, `/usr/local/cuda`): `lib64/`, `lib/`;
//! 5. the system's library folders;
//! 6. the NCCL wheel (`nvidia/nccl/lib`) in a virtual environment (`VIRTUAL_ENV`), a
//!    conda environment (`CONDA_PREFIX`), the user's and the system's Python packages.
//!
//! In each folder `libnccl.so.2` is tried before `libnccl.so`. Nothing found is an error
//! that names every place looked in.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The file names NCCL's library goes by, most common first.
const NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];

/// The system's library folders.
const SYSTEM: [&str; 6] = [
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
    "/usr/local/nccl/lib",
];

/// Where NCCL is looked for, in order: files to try, given the environment `env`.
pub fn candidates(env: &dyn Fn(&str) -> Option<String>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut files: Vec<PathBuf> = Vec::new();
    if let Some(explicit) = env("XTUNER_NCCL") {
        let path = PathBuf::from(explicit);
        if path.is_dir() {
            dirs.push(path);
        } else {
            files.push(path);
        }
    }
    for key in ["NCCL_HOME", "NCCL_ROOT"] {
        if let Some(home) = env(key) {
            let home = PathBuf::from(home);
            dirs.extend([home.join("lib"), home.join("lib64"), home]);
        }
    }
    if let Some(paths) = env("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&paths).filter(|p| !p.as_os_str().is_empty()));
    }
    let mut toolkits: Vec<PathBuf> = ["CUDA_PATH", "CUDA_HOME"]
        .iter()
        .filter_map(|k| env(k).map(PathBuf::from))
        .collect();
    toolkits.push(PathBuf::from("/usr/local/cuda"));
    for toolkit in toolkits {
        dirs.extend([toolkit.join("lib64"), toolkit.join("lib")]);
    }
    dirs.extend(SYSTEM.iter().map(PathBuf::from));
    let mut prefixes: Vec<PathBuf> = ["VIRTUAL_ENV", "CONDA_PREFIX"]
        .iter()
        .filter_map(|k| env(k).map(PathBuf::from))
        .collect();
    if let Some(home) = env("HOME") {
        prefixes.push(PathBuf::from(home).join(".local"));
    }
    prefixes.extend(["/usr/local", "/usr", "/opt/conda"].map(PathBuf::from));
    for prefix in prefixes {
        dirs.extend(python_package_dirs(&prefix.join("lib")));
    }
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.clone()));
    files.extend(
        dirs.iter()
            .flat_map(|d| NAMES.iter().map(move |name| d.join(name))),
    );
    files
}

/// `lib/python3.*/{site,dist}-packages/nvidia/nccl/lib` under `lib`, for every Python
/// found there.
fn python_package_dirs(lib: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(lib) else {
        return Vec::new();
    };
    let mut pythons: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("python3"))
        })
        .collect();
    pythons.sort();
    pythons
        .into_iter()
        .flat_map(|python| {
            ["site-packages", "dist-packages"]
                .map(|packages| python.join(packages).join("nvidia/nccl/lib"))
        })
        .collect()
}

/// NCCL's library: the first of [`candidates`] that is a file.
///
/// # Errors
/// None is: the error names the settings and the folders looked in.
pub fn library(env: &dyn Fn(&str) -> Option<String>) -> Result<PathBuf> {
    let candidates = candidates(env);
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let mut places: Vec<String> = Vec::new();
    for path in &candidates {
        let place = path
            .parent()
            .map_or_else(|| path.display().to_string(), |d| d.display().to_string());
        if !places.contains(&place) {
            places.push(place);
        }
    }
    Err(Error::Collective(format!(
        "NCCL not found: set XTUNER_NCCL to its library (libnccl.so.2) or NCCL_HOME to its \
         installation (`pip install nvidia-nccl-cu13` puts it in \
         site-packages/nvidia/nccl/lib), or run the ranks through the host with \
         XTUNER_COLLECTIVE=tcp; looked for {} in: {}",
        NAMES.join(" and "),
        places.join(", ")
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &Path)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.display().to_string()))
            .collect();
        move |key| vars.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    #[test]
    fn the_settings_come_first_and_the_wheels_name_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("nccl");
        std::fs::create_dir_all(home.join("lib")).unwrap();
        std::fs::write(home.join("lib/libnccl.so.2"), b"").unwrap();
        let found = library(&env(&[("NCCL_HOME", &home)])).unwrap();
        assert_eq!(found, home.join("lib/libnccl.so.2"));

        // XTUNER_NCCL, a file, wins over NCCL_HOME.
        let file = dir.path().join("custom.so");
        std::fs::write(&file, b"").unwrap();
        let found = library(&env(&[("XTUNER_NCCL", &file), ("NCCL_HOME", &home)])).unwrap();
        assert_eq!(found, file);

        // A virtual environment's wheel.
        let venv = dir.path().join("venv");
        let wheel = venv.join("lib/python3.12/site-packages/nvidia/nccl/lib");
        std::fs::create_dir_all(&wheel).unwrap();
        std::fs::write(wheel.join("libnccl.so.2"), b"").unwrap();
        let all = candidates(&env(&[("VIRTUAL_ENV", &venv)]));
        assert!(all.contains(&wheel.join("libnccl.so.2")), "{all:?}");
    }

    #[test]
    fn nothing_found_names_where_it_looked() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nowhere");
        let candidates = candidates(&env(&[("NCCL_HOME", &missing)]));
        if candidates.iter().any(|p| p.is_file()) {
            return; // This machine has NCCL installed.
        }
        let err = library(&env(&[("NCCL_HOME", &missing)]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("NCCL not found"), "{err}");
        assert!(err.contains("XTUNER_NCCL"), "{err}");
        assert!(
            err.contains(&missing.join("lib").display().to_string()),
            "{err}"
        );
        assert!(err.contains("/usr/local/cuda/lib64"), "{err}");
    }
}
