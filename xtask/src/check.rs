//! `cargo xtask check`: the project's layout.
//!
//! - the crates depend on each other only as [`DESIGN`] allows (`cargo metadata`);
//! - no two modules of a crate import each other, directly or round a longer loop;
//! - no source file is over [`MAX_LINES`] lines, its test module aside.
//!
//! The module graph is read from the source text, not from the compiler: every
//! `crate::a::b` path, `use crate::{..}` group and `super::` path outside comments and
//! the test module is an edge to the longest module it names. That is approximate (a
//! path in a string literal counts) but needs no build and errs towards more edges.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The designed crate graph: each workspace package and the workspace packages it may
/// depend on (normal, build and dev dependencies alike).
#[rustfmt::skip]
const DESIGN: &[(&str, &[&str])] = &[
    ("xtuner-template", &[]),
    ("xtuner-dataset", &["xtuner-template"]),
    ("xtuner-model", &["xtuner-template"]),
    ("xtuner-engine", &["xtuner-template", "xtuner-dataset", "xtuner-model"]),
    ("xtuner-cli", &["xtuner-template", "xtuner-dataset", "xtuner-model", "xtuner-engine"]),
    ("xtask", &[]),
];

/// Source files that are generated data, exempt from the line limit (paths from the root).
const GENERATED: &[&str] = &[];

/// The most lines a source file may have before its test module.
const MAX_LINES: usize = 800;

/// A workspace package and the workspace packages it depends on.
type Package = (String, BTreeSet<String>);

/// Runs every check, printing one line per check and every problem found.
pub fn run() -> Result<()> {
    run_in(Path::new("."))
}

/// The check of the workspace at `root`.
fn run_in(root: &Path) -> Result<()> {
    let (mut cycles, mut long) = (Vec::new(), Vec::new());
    for (krate, dir) in source_dirs(root)? {
        let files = read_sources(&dir)?;
        cycles.extend(module_cycles(&krate, &files));
        let path = |rel: &str| format!("{}/{rel}", dir.display());
        long.extend(
            files
                .iter()
                .filter_map(|(f, text)| long_file(&path(f), text)),
        );
    }
    let checks = [
        (
            "crate graph as designed",
            dag_problems(&workspace_deps(root)?),
        ),
        ("no module import cycles", cycles),
        ("no source file over 800 lines", long),
    ];
    for (name, problems) in &checks {
        let found = problems
            .iter()
            .map(|p| format!("\n  {p}"))
            .collect::<String>();
        match problems.len() {
            0 => println!("{name}: ok"),
            n => println!("{name}: {n} problem(s){found}"),
        }
    }
    let total: usize = checks.iter().map(|(_, problems)| problems.len()).sum();
    if total > 0 {
        bail!("check: {total} problem(s)");
    }
    println!("check: ok");
    Ok(())
}

/// Each workspace package with the workspace packages it depends on, from `cargo metadata`.
fn workspace_deps(root: &Path) -> Result<Vec<Package>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!("cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    }
    parse_metadata(&String::from_utf8_lossy(&out.stdout))
}

/// Reads `cargo metadata --no-deps` output into (package, its deps on workspace packages).
fn parse_metadata(json: &str) -> Result<Vec<Package>> {
    let meta: serde_json::Value = serde_json::from_str(json).context("parsing cargo metadata")?;
    let packages = meta["packages"].as_array().context("no packages")?;
    let name = |p: &serde_json::Value| p["name"].as_str().map(String::from);
    let ours: BTreeSet<String> = packages.iter().filter_map(name).collect();
    let package = |p: &serde_json::Value| {
        let deps = p["dependencies"].as_array()?.iter().filter_map(name);
        Some((name(p)?, deps.filter(|d| ours.contains(d)).collect()))
    };
    Ok(packages.iter().filter_map(package).collect())
}

/// Every dependency edge outside [`DESIGN`], and every package it does not list.
fn dag_problems(packages: &[Package]) -> Vec<String> {
    let mut out = Vec::new();
    for (pkg, deps) in packages {
        let Some((_, allowed)) = DESIGN.iter().find(|(name, _)| name == pkg) else {
            out.push(format!("{pkg} is a package the design does not list"));
            continue;
        };
        for dep in deps.iter().filter(|d| !allowed.contains(&d.as_str())) {
            let problem = format!("{pkg} depends on {dep}, which the design does not allow");
            out.push(problem);
        }
    }
    out
}

/// The source folders to scan: (crate name, `crates/NAME/src`) and `xtask/src`.
fn source_dirs(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(root.join("crates")).context("listing crates/")? {
        let path = entry?.path();
        if let Some(name) = path.file_name().and_then(|n| n.to_str())
            && path.join("src").is_dir()
        {
            dirs.push((name.to_string(), path.join("src")));
        }
    }
    dirs.sort();
    dirs.push(("xtask".to_string(), root.join("xtask/src")));
    Ok(dirs)
}

/// Every `.rs` file under `dir`: (path relative to `dir` with `/` separators, text).
fn read_sources(dir: &Path) -> Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(folder) = pending.pop() {
        let entries = std::fs::read_dir(&folder);
        for entry in entries.with_context(|| format!("listing {}", folder.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(dir)?.to_string_lossy().replace('\\', "/");
                let text = std::fs::read_to_string(&path);
                files.push((
                    rel,
                    text.with_context(|| format!("reading {}", path.display()))?,
                ));
            }
        }
    }
    files.sort();
    Ok(files)
}

/// A problem if `text` (of the file at `path`) is over the limit before its test module.
fn long_file(path: &str, text: &str) -> Option<String> {
    let lines = code_part(text).matches('\n').count();
    (lines > MAX_LINES && !GENERATED.contains(&path))
        .then(|| format!("{path}: {lines} lines (over {MAX_LINES}; tests aside)"))
}

/// The text before the test module (`#[cfg(test)]`, blanks, `mod tests`), if any.
fn code_part(text: &str) -> &str {
    const CFG: &str = "#[cfg(test)]";
    let mut from = 0;
    while let Some(at) = text[from..].find(CFG) {
        let start = from + at;
        let rest = text[start + CFG.len()..].trim_start();
        if rest.starts_with("mod tests") {
            return &text[..start];
        }
        from = start + CFG.len();
    }
    text
}

/// The module id of a file at `rel` under `src`: `nn/gemm.rs` is `nn/gemm`, `nn/mod.rs`
/// is `nn`; `None` for the crate root (`lib.rs`, `main.rs`).
fn module_id(rel: &str) -> Option<String> {
    let id = rel.strip_suffix(".rs")?;
    let id = id.strip_suffix("/mod").unwrap_or(id);
    (!matches!(id, "lib" | "main")).then(|| id.to_string())
}

/// `text` without `//` comments (doc comments included); a `//` in a string is kept.
fn strip_comments(text: &str) -> String {
    let lines = text
        .lines()
        .map(|l| &l[..comment_start(l).unwrap_or(l.len())]);
    lines.collect::<Vec<_>>().join("\n")
}

/// Where a line's `//` comment starts, outside double-quoted strings on that line.
fn comment_start(line: &str) -> Option<usize> {
    let bytes = line.as_bytes();
    let (mut i, mut in_string) = (0, false);
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if in_string => i += 1,
            b'"' => in_string = !in_string,
            b'\'' if !in_string && bytes[i..].starts_with(b"'\"'") => i += 2,
            b'\'' if !in_string && bytes[i..].starts_with(b"'\\\"'") => i += 3,
            b'/' if !in_string && bytes.get(i + 1) == Some(&b'/') => return Some(i),
            _ => {}
        }
        i += 1;
    }
    None
}

/// Whether `b` can be part of an identifier.
fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// A position in source text, for reading paths.
struct Cursor<'a> {
    /// The text.
    text: &'a [u8],
    /// The next byte to read.
    at: usize,
}

impl<'a> Cursor<'a> {
    /// Skips whitespace, then `token` if it comes next.
    fn eat(&mut self, token: &str) -> bool {
        while self.text.get(self.at).is_some_and(u8::is_ascii_whitespace) {
            self.at += 1;
        }
        let found = self.text[self.at..].starts_with(token.as_bytes());
        self.at += if found { token.len() } else { 0 };
        found
    }

    /// Skips whitespace, then reads an identifier if one comes next.
    fn ident(&mut self) -> Option<&'a str> {
        self.eat("");
        let start = self.at;
        while self.text.get(self.at).copied().is_some_and(is_ident) {
            self.at += 1;
        }
        let ident = std::str::from_utf8(&self.text[start..self.at]).ok();
        ident.filter(|s| !s.is_empty())
    }

    /// Reads the rest of a path or use tree after `path::`, pushing each full path named.
    fn tree(&mut self, mut path: Vec<&'a str>, out: &mut Vec<String>) {
        let mut grew = false;
        loop {
            if self.eat("{") {
                loop {
                    self.tree(path.clone(), out);
                    // the rest of the item (`as name`, `*`) up to `,` or the closing `}`
                    loop {
                        let next = self.text.get(self.at).copied();
                        self.at += 1;
                        match next {
                            Some(b',') => break,
                            Some(b'}') | None => return,
                            _ => {}
                        }
                    }
                }
            }
            let Some(segment) = self.ident() else { break };
            path.push(segment);
            grew = true;
            if !self.eat("::") {
                break;
            }
        }
        if grew {
            out.push(path.join("/"));
        }
    }
}

/// The paths module `module` names through `crate::` and `super::`, from the crate root
/// (`nn/gemm/Gemm`), in comment-free `code`.
fn imports(module: &str, code: &str) -> Vec<String> {
    let mut parent: Vec<&str> = module.split('/').collect();
    parent.pop();
    let text = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < text.len() {
        let boundary = i == 0 || !(is_ident(text[i - 1]) || text[i - 1] == b':');
        // past `crate::` or `super::`, both 7 bytes
        let mut cur = Cursor { text, at: i + 7 };
        if boundary && text[i..].starts_with(b"crate::") {
            cur.tree(Vec::new(), &mut out);
        } else if boundary && text[i..].starts_with(b"super::") {
            let mut base = Some(parent.clone());
            loop {
                let save = cur.at;
                if cur.ident() == Some("super") && cur.eat("::") {
                    base = base.and_then(|mut b| b.pop().map(|_| b));
                } else {
                    cur.at = save;
                    break;
                }
            }
            // `None` when the path climbs above the crate root
            if let Some(base) = base {
                cur.tree(base, &mut out);
            }
        } else {
            i += 1;
            continue;
        }
        i = cur.at;
    }
    out
}

/// The longest module of `modules` that `path` starts with, unless it is `me` or one of
/// `me`'s ancestors.
fn resolve<'m>(
    path: &str,
    me: &str,
    modules: &'m BTreeMap<String, Vec<String>>,
) -> Option<&'m str> {
    let parts: Vec<&str> = path.split('/').collect();
    let mut prefixes = (1..=parts.len()).rev().map(|k| parts[..k].join("/"));
    let found = prefixes.find_map(|p| modules.get_key_value(&p))?.0.as_str();
    (found != me && !me.starts_with(&format!("{found}/"))).then_some(found)
}

/// The module import cycles of crate `krate`, from its `src` files (path under `src`, text).
fn module_cycles(krate: &str, files: &[(String, String)]) -> Vec<String> {
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (rel, text) in files {
        if let Some(id) = module_id(rel) {
            let found = imports(&id, &strip_comments(code_part(text)));
            deps.entry(id).or_default().extend(found);
        }
    }
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (me, paths) in &deps {
        graph.insert(
            me,
            paths.iter().filter_map(|p| resolve(p, me, &deps)).collect(),
        );
    }
    let cycles = strongly_connected(&graph)
        .into_iter()
        .map(|c| c.join(" <-> "));
    cycles
        .map(|c| format!("{krate}: modules import each other: {c}"))
        .collect()
}

/// Tarjan's state while finding strongly connected components.
#[derive(Default)]
struct Tarjan<'a> {
    /// Each visited node's low link: the earliest visit it reaches still on the stack.
    low: BTreeMap<&'a str, usize>,
    /// The visited nodes whose component is not closed yet.
    stack: Vec<&'a str>,
    /// The components of more than one node, each sorted.
    found: Vec<Vec<&'a str>>,
}

impl<'a> Tarjan<'a> {
    /// Visits `v` and every node reachable from it in `graph`.
    fn visit(&mut self, graph: &BTreeMap<&'a str, BTreeSet<&'a str>>, v: &'a str) {
        let order = self.low.len();
        let mut low = order;
        self.low.insert(v, order);
        self.stack.push(v);
        for &w in graph.get(v).into_iter().flatten() {
            if !self.low.contains_key(w) {
                self.visit(graph, w);
            }
            if self.stack.contains(&w) {
                low = low.min(self.low.get(w).copied().unwrap_or(low));
            }
        }
        self.low.insert(v, low);
        if low == order {
            let at = self.stack.iter().rposition(|&x| x == v).unwrap_or(0);
            let mut component = self.stack.split_off(at);
            if component.len() > 1 {
                component.sort();
                self.found.push(component);
            }
        }
    }
}

/// The strongly connected components of more than one node (Tarjan), each sorted.
fn strongly_connected<'a>(graph: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Vec<Vec<&'a str>> {
    let mut tarjan = Tarjan::default();
    for &v in graph.keys() {
        if !tarjan.low.contains_key(v) {
            tarjan.visit(graph, v);
        }
    }
    tarjan.found.sort();
    tarjan.found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The repository itself passes: `cargo test --workspace` (CI's first step) checks
    /// the layout with everything else.
    #[test]
    fn the_repository_passes() {
        run_in(&Path::new(env!("CARGO_MANIFEST_DIR")).join("..")).unwrap();
    }

    fn pkg(name: &str, deps: &[&str]) -> Package {
        let deps = deps.iter().map(|d| d.to_string());
        (name.to_string(), deps.collect())
    }

    /// The paths `module` names in `code`, space-separated.
    fn paths(module: &str, code: &str) -> String {
        imports(module, code).join(" ")
    }

    #[test]
    fn module_ids() {
        let files = "nn/gemm.rs nn/mod.rs recipe/model.rs a/b/mod.rs lib.rs main.rs".split(' ');
        let ids: Vec<_> = files
            .map(|f| module_id(f).unwrap_or_else(|| "-".into()))
            .collect();
        assert_eq!(ids.join(" "), "nn/gemm nn recipe/model a/b - -");
    }

    #[test]
    fn crate_paths_and_groups() {
        let code = "use crate::nn::gemm::Gemm;\nuse crate::{a, b::{c, d::e}, f as g, h::*};\n\
                    pub(crate) fn x() { crate::train::run(1); crate::loss::Loss { n: 1 }; }";
        let want = "nn/gemm/Gemm a b/c b/d/e f h train/run loss/Loss";
        assert_eq!(paths("x", code), want);
    }

    #[test]
    fn super_paths() {
        assert_eq!(
            paths("nn/gemm", "use super::cublas::Blas;"),
            "nn/cublas/Blas"
        );
        assert_eq!(paths("nn", "super::data::Row::new()"), "data/Row/new");
        assert_eq!(paths("nn/gemm", "use super::{a, b::C};"), "nn/a nn/b/C");
        assert_eq!(paths("a/b/c", "use super::super::x;"), "a/x");
        assert_eq!(paths("nn", "use super::super::x;"), "");
    }

    #[test]
    fn comments_are_ignored_but_not_urls() {
        let text = "/// See [`crate::train::run`].\n//! crate::doc\n\
                    let u = \"https://x\"; crate::real::f(); // crate::no\n\
                    let c = '\"'; crate::after_char::g(); // crate::not";
        assert_eq!(paths("m", &strip_comments(text)), "real/f after_char/g");
    }

    #[test]
    fn components() {
        let graph = |edges: &'static str| {
            let mut g: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
            for (a, b) in edges.split(' ').filter_map(|e| e.split_once('>')) {
                g.entry(a).or_default().insert(b);
                g.entry(b).or_default();
            }
            g
        };
        let cyclic = graph("a>b b>c c>a c>d d>e e>d e>f");
        assert_eq!(
            strongly_connected(&cyclic),
            [vec!["a", "b", "c"], vec!["d", "e"]]
        );
        let acyclic = graph("a>b b>c a>c d>a");
        assert!(strongly_connected(&acyclic).is_empty());
    }

    #[test]
    fn cycles_skip_ancestors_and_tests() {
        let files = [
            ("lib.rs", "mod nn; use crate::data::X;"),
            ("nn/mod.rs", "use crate::data::X;\nuse crate::nn::gemm::G;"),
            ("nn/gemm.rs", "use crate::nn::Thing;\nuse super::cublas::Y;"),
            ("nn/cublas.rs", "use crate::nn::gemm::Z;"),
            (
                "data.rs",
                "crate::nn::q();\n#[cfg(test)]\nmod tests { crate::lone::a(); }",
            ),
            ("lone.rs", "use crate::data::X; // crate::nn::ignored"),
        ];
        let files: Vec<_> = files.iter().map(|&(f, t)| (f.into(), t.into())).collect();
        let want = ["data <-> nn", "nn/cublas <-> nn/gemm"];
        let want = want.map(|c| format!("k: modules import each other: {c}"));
        assert_eq!(module_cycles("k", &files), want);
    }

    #[test]
    fn lines_before_the_test_module() {
        let text = "a\nb\n#[cfg(test)]\nmod helpers;\nc\n#[cfg(test)]\n  mod tests {\n}\n";
        assert_eq!(code_part(text).matches('\n').count(), 5);
        let long = "x\n".repeat(801) + "#[cfg(test)]\nmod tests {\n" + &"y\n".repeat(900);
        let want = "a.rs: 801 lines (over 800; tests aside)";
        assert_eq!(long_file("a.rs", &long).as_deref(), Some(want));
        let fine = "x\n".repeat(800) + "#[cfg(test)] mod tests {\n" + &"y\n".repeat(900);
        assert_eq!(long_file("a.rs", &fine), None);
    }

    #[test]
    fn dag() {
        let engine = pkg("xtuner-engine", &["xtuner-model"]);
        let model = pkg("xtuner-model", &["xtuner-dataset"]);
        let problems = dag_problems(&[engine, model, pkg("xtuner-extra", &[])]);
        let want = [
            "xtuner-model depends on xtuner-dataset, which the design does not allow",
            "xtuner-extra is a package the design does not list",
        ];
        assert_eq!(problems, want);
    }

    #[test]
    fn metadata() {
        let json = r#"{"packages": [
            {"name": "xtuner-model", "dependencies": [{"name": "burn", "kind": null},
                {"name": "xtuner-dataset", "kind": "dev"}, {"name": "xtuner-dataset"}]},
            {"name": "xtuner-dataset", "dependencies": []}]}"#;
        let want = [
            pkg("xtuner-model", &["xtuner-dataset"]),
            pkg("xtuner-dataset", &[]),
        ];
        assert_eq!(parse_metadata(json).unwrap(), want);
    }
}
