//! `cargo xtask layers [--graph]`: checks that the modules of host/src
//! import one another one way only (DEVELOPERS.md, "How `host/src` is
//! layered").
//!
//! Every `.rs` file under host/src is a module: `lib.rs` and `main.rs` are
//! the crate root, `a.rs` and `a/mod.rs` are `a`, `a/b.rs` is `a::b`. A file
//! refers to another module through `crate::`, `super::` and `self::` paths,
//! in `use` trees or anywhere in code; `crate::a::b::Item` names `a::b` when
//! that module exists, else `a`. The check fails on
//!
//! - a cycle among the children of one module: the top-level modules, or
//!   the files of one module (`runtime::state` and `runtime::stdio`
//!   referring to each other). A child's references to its own parent are
//!   no edge: the parent's items are what its children share;
//! - an edge of [`FORBIDDEN`].
//!
//! The parsing is rough on purpose (comments and literals blanked, then
//! tokens, no rustc): paths are all it needs, and it takes milliseconds.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// `(from, to)`: no file of `from` or its submodules may refer to `to` or
/// its submodules. The event path's core knows the host's own model of an
/// event, never the source it came from.
const FORBIDDEN: &[(&str, &str)] = &[
    ("dispatch", "nutanix"),
    ("ledger", "nutanix"),
    ("runtime", "nutanix"),
    ("registry", "nutanix"),
    ("listener", "nutanix"),
];

/// A module's path below the crate root; empty for the root.
type ModPath = Vec<String>;

pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let graph_wanted = match args {
        [] => false,
        [flag] if flag == "--graph" => true,
        _ => bail!("usage: cargo xtask layers [--graph]"),
    };
    let src = root.join("host/src");
    let mut files = Vec::new();
    for path in rust_files(&src)? {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let shown = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .display()
            .to_string();
        files.push(SourceFile {
            module: module_path(path.strip_prefix(&src)?),
            shown,
            text,
        });
    }
    let graph = Graph::new(&files);
    let levels = graph.levels();
    if graph_wanted {
        for level in levels.iter().filter(|l| !l.edges.is_empty()) {
            println!("# {}", level.title());
            for (from, to) in level.edges.keys() {
                println!("{} -> {}", name(from), name(to));
            }
        }
    }
    let mut violations = 0;
    for level in &levels {
        for cycle in cycles(&level.edges) {
            violations += 1;
            let names: Vec<String> = cycle.iter().map(|m| name(m)).collect();
            eprintln!(
                "layers: a cycle among {}: {}",
                level.title(),
                names.join(" -> ")
            );
            for pair in cycle.windows(2) {
                let r = &graph.refs[level.edges[&(pair[0].clone(), pair[1].clone())]];
                eprintln!(
                    "    {} -> {}: {}:{}: {}",
                    name(&pair[0]),
                    name(&pair[1]),
                    r.file,
                    r.line,
                    r.text
                );
            }
        }
    }
    for (from, to) in FORBIDDEN {
        let offending = graph.refs_between(from, to);
        if !offending.is_empty() {
            violations += 1;
            eprintln!("layers: {from} must not refer to {to}");
            for r in offending {
                eprintln!("    {}:{}: {}", r.file, r.line, r.text);
            }
        }
    }
    if violations > 0 {
        // Not an error with a backtrace: the listing above is the message.
        eprintln!(
            "layers: {violations} violation(s) in host/src, listed above \
             (DEVELOPERS.md, \"How `host/src` is layered\")"
        );
        std::process::exit(1);
    }
    let edges: usize = levels.iter().map(|l| l.edges.len()).sum();
    println!(
        "layers: {} modules, {edges} edges, no cycles",
        graph.modules.len()
    );
    Ok(())
}

/// The `.rs` files under `dir`, sorted, so the output is stable.
fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    Ok(files)
}

/// The module a file under host/src is, from its path relative to host/src.
fn module_path(rel: &Path) -> ModPath {
    let mut parts: ModPath = rel
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    let file = parts.pop().unwrap_or_default();
    let stem = file.strip_suffix(".rs").unwrap_or(&file);
    let is_root = parts.is_empty() && (stem == "lib" || stem == "main");
    if !is_root && stem != "mod" {
        parts.push(stem.to_owned());
    }
    parts
}

fn name(module: &[String]) -> String {
    if module.is_empty() {
        "crate".to_owned()
    } else {
        module.join("::")
    }
}

struct SourceFile {
    module: ModPath,
    /// The path as printed, relative to the repository.
    shown: String,
    text: String,
}

/// One file's reference to another module.
#[derive(Debug)]
struct Reference {
    from: ModPath,
    to: ModPath,
    file: String,
    line: usize,
    /// The source line, trimmed.
    text: String,
}

struct Graph {
    modules: BTreeSet<ModPath>,
    refs: Vec<Reference>,
}

/// The edges among the children of one module: `a -> b` when a file of
/// child `a` (or below it) refers to child `b` (or below it). Each edge
/// keeps its first reference, as an example.
struct Level {
    parent: ModPath,
    edges: BTreeMap<(ModPath, ModPath), usize>,
}

impl Level {
    fn title(&self) -> String {
        if self.parent.is_empty() {
            "the top-level modules of host/src".to_owned()
        } else {
            format!("the submodules of {}", name(&self.parent))
        }
    }
}

impl Graph {
    fn new(files: &[SourceFile]) -> Graph {
        let modules: BTreeSet<ModPath> = files
            .iter()
            .map(|f| f.module.clone())
            .filter(|m| !m.is_empty())
            .collect();
        let mut refs = Vec::new();
        for file in files {
            let lines: Vec<&str> = file.text.lines().collect();
            for found in crate_paths(&tokens(&blank_comments_and_literals(&file.text))) {
                let mut here = file.module.clone();
                here.extend(found.scope);
                let Some(to) = resolve(&found.segments, &here, &modules) else {
                    continue;
                };
                // `a::{self, B}` names `a` twice on one line.
                let seen = refs.last().is_some_and(|r: &Reference| {
                    r.to == to && r.line == found.line && r.file == file.shown
                });
                if to == file.module || seen {
                    continue;
                }
                refs.push(Reference {
                    from: file.module.clone(),
                    to,
                    file: file.shown.clone(),
                    line: found.line,
                    text: lines
                        .get(found.line - 1)
                        .map_or("", |l| l.trim())
                        .to_owned(),
                });
            }
        }
        Graph { modules, refs }
    }

    /// The crate root, then every module with submodules.
    fn levels(&self) -> Vec<Level> {
        let parents: BTreeSet<ModPath> = std::iter::once(Vec::new())
            .chain(self.modules.iter().map(|m| m[..m.len() - 1].to_vec()))
            .collect();
        parents
            .into_iter()
            .map(|parent| {
                let mut edges = BTreeMap::new();
                let depth = parent.len();
                for (i, r) in self.refs.iter().enumerate() {
                    let below = |m: &ModPath| m.len() > depth && m.starts_with(&parent);
                    if below(&r.from) && below(&r.to) && r.from[depth] != r.to[depth] {
                        edges
                            .entry((r.from[..=depth].to_vec(), r.to[..=depth].to_vec()))
                            .or_insert(i);
                    }
                }
                Level { parent, edges }
            })
            .collect()
    }

    /// Every reference from `from` or below to `to` or below.
    fn refs_between(&self, from: &str, to: &str) -> Vec<&Reference> {
        let from: ModPath = from.split("::").map(str::to_owned).collect();
        let to: ModPath = to.split("::").map(str::to_owned).collect();
        self.refs
            .iter()
            .filter(|r| r.from.starts_with(&from) && r.to.starts_with(&to))
            .collect()
    }
}

/// Each cycle, as its modules with the first repeated at the end, starting
/// from its smallest: for every edge `a -> b`, the shortest way back from
/// `b` to `a`, so every edge that lies on a cycle shows in one.
fn cycles<V>(edges: &BTreeMap<(ModPath, ModPath), V>) -> Vec<Vec<ModPath>> {
    let mut next: BTreeMap<&ModPath, Vec<&ModPath>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        next.entry(from).or_default().push(to);
    }
    let mut found = BTreeSet::new();
    for (a, b) in edges.keys() {
        // Breadth first from b, remembering how each module was reached.
        let mut reached_from: BTreeMap<&ModPath, &ModPath> = BTreeMap::new();
        let mut queue = VecDeque::from([b]);
        while let Some(m) = queue.pop_front() {
            if m == a {
                break;
            }
            for &n in next.get(m).into_iter().flatten() {
                if n != b && !reached_from.contains_key(n) {
                    reached_from.insert(n, m);
                    queue.push_back(n);
                }
            }
        }
        if !reached_from.contains_key(a) {
            continue;
        }
        let mut back = vec![a.clone()];
        let mut m = a;
        while m != b {
            m = reached_from[m];
            back.push(m.clone());
        }
        // back is a, ..., b: the cycle is a -> b -> ... -> a.
        let mut cycle: Vec<ModPath> = std::iter::once(a.clone())
            .chain(back.into_iter().rev())
            .collect();
        cycle.pop();
        let start = (0..cycle.len()).min_by_key(|&i| &cycle[i]).unwrap();
        cycle.rotate_left(start);
        cycle.push(cycle[0].clone());
        found.insert((cycle.len(), cycle));
    }
    found.into_iter().map(|(_, cycle)| cycle).collect()
}

/// Where a path leads: the deepest existing module it names, `None` for the
/// crate root, a path that climbs above it or one that is not the crate's.
fn resolve(segments: &[String], here: &[String], modules: &BTreeSet<ModPath>) -> Option<ModPath> {
    let (first, rest) = segments.split_first()?;
    let mut path: ModPath = match first.as_str() {
        "crate" => Vec::new(),
        "self" => here.to_vec(),
        "super" => here.split_last()?.1.to_vec(),
        _ => return None,
    };
    let mut rest = rest.iter().peekable();
    if first == "super" {
        while rest.next_if(|s| *s == "super").is_some() {
            path.pop()?;
        }
    }
    path.extend(rest.cloned());
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|m| modules.contains(m))
}

/// A `crate::`/`super::`/`self::` path as written, with the inline modules
/// (`mod tests { ... }`) it sits in and the line of its last segment.
#[derive(Debug, PartialEq)]
struct FoundPath {
    segments: Vec<String>,
    scope: Vec<String>,
    line: usize,
}

struct Token {
    text: String,
    line: usize,
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

fn is_ident(token: &Token) -> bool {
    token
        .text
        .starts_with(|c: char| c.is_alphabetic() || c == '_')
}

/// Identifiers, `::` and single punctuation characters, each with its line.
fn tokens(code: &str) -> Vec<Token> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        if c == '\n' {
            line += 1;
            i += 1;
            continue;
        } else if c.is_whitespace() {
            i += 1;
            continue;
        } else if is_ident_char(c) {
            while i < chars.len() && is_ident_char(chars[i]) {
                i += 1;
            }
        } else if c == ':' && chars.get(i + 1) == Some(&':') {
            i += 2;
        } else {
            i += 1;
        }
        out.push(Token {
            text: chars[start..i].iter().collect(),
            line,
        });
    }
    out
}

/// Every path into the crate in the tokens of one file: each leaf of a
/// `use` tree, and each `crate::`, `super::` or `self::` path in code.
fn crate_paths(tokens: &[Token]) -> Vec<FoundPath> {
    let mut found = Vec::new();
    let mut depth: usize = 0;
    // Inline modules around the current token, with the brace depth inside each.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let scope = |inline: &[(String, usize)]| inline.iter().map(|(n, _)| n.clone()).collect();
    let text = |i: usize| tokens.get(i).map_or("", |t| t.text.as_str());
    let mut i = 0;
    while i < tokens.len() {
        match text(i) {
            "{" => depth += 1,
            "}" => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(_, inside)| depth < *inside) {
                    inline.pop();
                }
            }
            "mod" if text(i + 2) == "{" && tokens.get(i + 1).is_some_and(is_ident) => {
                depth += 1;
                inline.push((text(i + 1).to_owned(), depth));
                i += 3;
                continue;
            }
            "use" => {
                let mut leaves = Vec::new();
                i = use_tree(tokens, i + 1, Vec::new(), &mut leaves);
                while i < tokens.len() && text(i) != ";" {
                    i += 1;
                }
                for (segments, line) in leaves {
                    found.push(FoundPath {
                        segments,
                        scope: scope(&inline),
                        line,
                    });
                }
            }
            "crate" | "super" | "self" if text(i + 1) == "::" && text(i.wrapping_sub(1)) != "$" => {
                let mut segments = vec![text(i).to_owned()];
                let mut line = tokens[i].line;
                i += 1;
                while text(i) == "::" && tokens.get(i + 1).is_some_and(is_ident) {
                    segments.push(text(i + 1).to_owned());
                    line = tokens[i + 1].line;
                    i += 2;
                }
                found.push(FoundPath {
                    segments,
                    scope: scope(&inline),
                    line,
                });
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    found
}

/// Parses one use tree from `tokens[i]` on, under `prefix`, adding each leaf
/// path and its line to `leaves`; returns the index after the tree.
fn use_tree(
    tokens: &[Token],
    mut i: usize,
    mut prefix: Vec<String>,
    leaves: &mut Vec<(Vec<String>, usize)>,
) -> usize {
    let text = |i: usize| tokens.get(i).map_or("", |t| t.text.as_str());
    if text(i) == "::" {
        i += 1;
    }
    loop {
        match text(i) {
            "{" => {
                i += 1;
                while i < tokens.len() && !matches!(text(i), "}" | ";") {
                    let after = use_tree(tokens, i, prefix.clone(), leaves);
                    // A token this parser does not know is skipped.
                    i = after.max(i + 1);
                    if text(i) == "," {
                        i += 1;
                    }
                }
                return if text(i) == "}" { i + 1 } else { i };
            }
            "*" => {
                leaves.push((prefix, tokens[i].line));
                return i + 1;
            }
            _ if tokens.get(i).is_some_and(is_ident) => {
                // `a::{self, b}` imports `a` itself.
                if text(i) != "self" || prefix.is_empty() {
                    prefix.push(text(i).to_owned());
                }
                let line = tokens[i].line;
                i += 1;
                if text(i) == "::" {
                    i += 1;
                    continue;
                }
                if text(i) == "as" {
                    i += 2;
                }
                leaves.push((prefix, line));
                return i;
            }
            // Not a use tree after all (or one this parser does not know).
            _ => return i,
        }
    }
}

/// The code with comments, strings and character literals replaced by
/// spaces, line breaks kept, so that paths and braces in them do not count
/// and line numbers still match the file.
fn blank_comments_and_literals(source: &str) -> String {
    let c: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    while i < c.len() {
        let end = if c[i] == '/' && c.get(i + 1) == Some(&'/') {
            c[i..]
                .iter()
                .position(|&ch| ch == '\n')
                .map_or(c.len(), |n| i + n)
        } else if c[i] == '/' && c.get(i + 1) == Some(&'*') {
            block_comment_end(&c, i)
        } else if let Some(end) = raw_string_end(&c, i) {
            end
        } else if c[i] == '"' {
            string_end(&c, i)
        } else if c[i] == '\'' {
            char_literal_end(&c, i).unwrap_or(i)
        } else {
            i
        };
        if end > i {
            out.extend(
                c[i..end]
                    .iter()
                    .map(|&ch| if ch == '\n' { '\n' } else { ' ' }),
            );
            i = end;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn block_comment_end(c: &[char], mut i: usize) -> usize {
    let mut depth = 0;
    while i < c.len() {
        if c[i] == '/' && c.get(i + 1) == Some(&'*') {
            depth += 1;
            i += 2;
        } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    c.len()
}

fn string_end(c: &[char], mut i: usize) -> usize {
    i += 1;
    while i < c.len() {
        match c[i] {
            '\\' => i += 2,
            '"' => return i + 1,
            _ => i += 1,
        }
    }
    c.len()
}

/// `r"…"`, `r#"…"#`, `br"…"` starting at `i`: where it ends.
fn raw_string_end(c: &[char], i: usize) -> Option<usize> {
    let starts_word = |at: usize| at == 0 || !is_ident_char(c[at - 1]);
    let prefixed = c[i] == 'r' && (starts_word(i) || (c[i - 1] == 'b' && starts_word(i - 1)));
    if !prefixed {
        return None;
    }
    let hashes = c[i + 1..].iter().take_while(|&&ch| ch == '#').count();
    if c.get(i + 1 + hashes) != Some(&'"') {
        return None;
    }
    let body = i + 2 + hashes;
    (body..c.len())
        .find(|&j| {
            c[j] == '"'
                && c[j + 1..]
                    .iter()
                    .take(hashes)
                    .filter(|&&h| h == '#')
                    .count()
                    == hashes
        })
        .map(|j| j + 1 + hashes)
        .or(Some(c.len()))
}

/// `'x'`, `'\n'`, `'\u{1F600}'` starting at `i`: where it ends; `None` for a
/// lifetime or label (`'a`, `'static`).
fn char_literal_end(c: &[char], i: usize) -> Option<usize> {
    if c.get(i + 1) == Some(&'\\') {
        (i + 3..c.len()).find(|&j| c[j] == '\'').map(|j| j + 1)
    } else if c.get(i + 2) == Some(&'\'') {
        Some(i + 3)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(path: &str) -> ModPath {
        path.split("::")
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn graph(files: &[(&str, &str)]) -> Graph {
        let files: Vec<SourceFile> = files
            .iter()
            .map(|(module, text)| SourceFile {
                module: m(module),
                shown: format!("{module}.rs"),
                text: text.to_string(),
            })
            .collect();
        Graph::new(&files)
    }

    fn targets(g: &Graph, from: &str) -> Vec<String> {
        g.refs
            .iter()
            .filter(|r| r.from == m(from))
            .map(|r| name(&r.to))
            .collect()
    }

    fn edge_names(level: &Level) -> Vec<String> {
        level
            .edges
            .keys()
            .map(|(a, b)| format!("{} -> {}", name(a), name(b)))
            .collect()
    }

    #[test]
    fn a_file_and_a_mod_rs_name_the_same_module_and_lib_and_main_the_root() {
        assert_eq!(module_path(Path::new("a.rs")), m("a"));
        assert_eq!(module_path(Path::new("a/mod.rs")), m("a"));
        assert_eq!(module_path(Path::new("a/b.rs")), m("a::b"));
        assert_eq!(module_path(Path::new("lib.rs")), m(""));
        assert_eq!(module_path(Path::new("main.rs")), m(""));
        assert_eq!(module_path(Path::new("a/main.rs")), m("a::main"));
    }

    #[test]
    fn comments_and_literals_are_blanked_and_lines_kept() {
        let code = "a // crate::x\n/* crate::y\n */ \"crate::z {\" r#\"crate::w\"# '{' 'a b\n";
        let blank = blank_comments_and_literals(code);
        assert_eq!(blank.lines().count(), code.lines().count());
        assert!(!blank.contains("crate"), "{blank:?}");
        assert!(!blank.contains('{'), "{blank:?}");
        assert!(blank.contains("'a b"), "a lifetime stays: {blank:?}");
    }

    #[test]
    fn each_leaf_of_a_use_group_names_its_deepest_existing_module() {
        let g = graph(&[
            (
                "a",
                "use crate::{\n    b::{self, Item},\n    c::d::Deep,\n    c::Missing::X,\n};\nuse crate::e as f;",
            ),
            ("b", ""),
            ("c", ""),
            ("c::d", ""),
            ("e", ""),
        ]);
        // `b::{self, Item}` is one reference to `b`.
        assert_eq!(targets(&g, "a"), ["b", "c::d", "c", "e"]);
        assert_eq!(
            g.refs.iter().map(|r| r.line).collect::<Vec<_>>(),
            [2, 3, 4, 6]
        );
    }

    #[test]
    fn paths_in_code_count_and_those_in_comments_strings_and_macros_do_not() {
        let g = graph(&[
            (
                "a",
                "fn f() { crate::b::go(); } // crate::c::no\nconst S: &str = \"crate::c\";\nmacro_rules! m { () => { $crate::c::no() } }",
            ),
            ("b", ""),
            ("c", ""),
        ]);
        assert_eq!(targets(&g, "a"), ["b"]);
    }

    #[test]
    fn super_and_self_resolve_from_the_module_and_its_inline_modules() {
        let g = graph(&[
            ("r", ""),
            (
                "r::state",
                "use super::stdio::Out;\nuse self::inner::X;\nmod tests {\n    use super::*;\n    use super::super::limits::L;\n}\nfn g() { super::policy::p() }",
            ),
            ("r::stdio", ""),
            ("r::limits", ""),
            ("r::policy", ""),
            ("r::state::inner", ""),
        ]);
        assert_eq!(
            targets(&g, "r::state"),
            ["r::stdio", "r::state::inner", "r::limits", "r::policy"]
        );
    }

    #[test]
    fn a_mutual_reference_between_siblings_is_one_cycle() {
        let g = graph(&[
            ("runtime", "use self::state::S;"),
            (
                "runtime::state",
                "use super::stdio::Out;\nuse super::Plugin;",
            ),
            ("runtime::stdio", "use super::state::HostState;"),
        ]);
        let levels = g.levels();
        let runtime = levels.iter().find(|l| l.parent == m("runtime")).unwrap();
        assert_eq!(
            edge_names(runtime),
            [
                "runtime::state -> runtime::stdio",
                "runtime::stdio -> runtime::state"
            ]
        );
        assert_eq!(
            cycles(&runtime.edges),
            [vec![
                m("runtime::state"),
                m("runtime::stdio"),
                m("runtime::state")
            ]]
        );
    }

    #[test]
    fn a_child_referring_to_its_parent_is_no_edge() {
        let g = graph(&[
            ("a", "pub struct Shared;"),
            ("a::x", "use super::Shared;\nuse crate::a::Shared as S;"),
            ("a::y", "use super::x::X;"),
        ]);
        let levels = g.levels();
        let a = levels.iter().find(|l| l.parent == m("a")).unwrap();
        assert_eq!(edge_names(a), ["a::y -> a::x"]);
        assert!(cycles(&a.edges).is_empty());
    }

    #[test]
    fn submodules_count_for_their_top_level_module() {
        let g = graph(&[
            ("admin", "use crate::dispatch::Dispatcher;"),
            ("dispatch", ""),
            ("dispatch::queue", "use crate::admin::api::Report;"),
            ("admin::api", ""),
        ]);
        let levels = g.levels();
        let top = &levels[0];
        assert!(top.parent.is_empty());
        assert_eq!(edge_names(top), ["admin -> dispatch", "dispatch -> admin"]);
        assert_eq!(
            cycles(&top.edges),
            [vec![m("admin"), m("dispatch"), m("admin")]]
        );
    }

    #[test]
    fn a_longer_cycle_is_found_once_from_its_smallest_module() {
        let edges: BTreeMap<(ModPath, ModPath), ()> =
            [("c", "a"), ("a", "b"), ("b", "c"), ("c", "d")]
                .into_iter()
                .map(|(a, b)| ((m(a), m(b)), ()))
                .collect();
        assert_eq!(cycles(&edges), [vec![m("a"), m("b"), m("c"), m("a")]]);
    }

    #[test]
    fn a_graph_without_cycles_has_none() {
        let edges: BTreeMap<(ModPath, ModPath), ()> = [("a", "b"), ("b", "c"), ("a", "c")]
            .into_iter()
            .map(|(a, b)| ((m(a), m(b)), ()))
            .collect();
        assert!(cycles(&edges).is_empty());
    }

    #[test]
    fn a_forbidden_edge_is_found_from_any_submodule() {
        let g = graph(&[
            ("runtime", ""),
            (
                "runtime::bindings",
                "fn f(v: crate::nutanix::payload::Vm) {}",
            ),
            ("nutanix", ""),
            ("nutanix::payload", ""),
        ]);
        let found = g.refs_between("runtime", "nutanix");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].file, "runtime::bindings.rs");
        assert!(g.refs_between("dispatch", "nutanix").is_empty());
    }
}
