//! The shape of `src/`: which module imports which. Imports flow one way
//! (top level → http → relay → proto, with companion, mesh and stun beside
//! the relay), so the import graph must have no cycles; the relay core names
//! no mesh type; and only the top level (`main.rs`, `server.rs`, `config*`)
//! names `config`.
//!
//! The analysis is textual and needs nothing but the sources: comments,
//! string and character literals are blanked out, then every path that
//! starts with `crate::`, `super::`, `self::`, `derpd::` (in the binary) or
//! a child module's name is resolved to the file that defines the module it
//! names, grouped imports (`use crate::{a, b::{c, d}}`) included.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module, as its path below the crate root (`relay::registry`); the
/// crate root itself is the empty path.
type Module = Vec<String>;

/// One source file and the module it defines.
struct Source {
    /// Path relative to `src/`, e.g. `relay/registry.rs`.
    file: String,
    module: Module,
    text: String,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `relay/registry.rs` → `relay::registry`, `relay/mod.rs` → `relay`,
/// `lib.rs` and `main.rs` → the crate root.
fn module_of(rel: &str) -> Module {
    let mut parts: Vec<String> = rel.split('/').map(str::to_owned).collect();
    let last = parts.pop().expect("file name");
    let stem = last.trim_end_matches(".rs");
    if !(stem == "mod" || (parts.is_empty() && (stem == "lib" || stem == "main"))) {
        parts.push(stem.to_owned());
    }
    parts
}

fn sources() -> Vec<Source> {
    let root = src_dir();
    let mut files = Vec::new();
    collect(&root, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let file = p
                .strip_prefix(&root)
                .expect("under src")
                .to_string_lossy()
                .replace('\\', "/");
            Source {
                module: module_of(&file),
                text: std::fs::read_to_string(&p).expect("read source"),
                file,
            }
        })
        .collect()
}

/// The source with comments (doc comments included), string literals and
/// character literals replaced by spaces; newlines are kept.
fn strip(src: &str) -> String {
    let c: Vec<char> = src.chars().collect();
    let mut out = String::with_capacity(src.len());
    let blank = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < c.len() {
        let ident_before = i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_');
        if at(&c, i) == '/' && at(&c, i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if at(&c, i) == '/' && at(&c, i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(blank(c[i]));
                    i += 1;
                }
            }
        } else if !ident_before
            && (at(&c, i) == 'r' || (at(&c, i) == 'b' && at(&c, i + 1) == 'r'))
            && {
                let s = if at(&c, i) == 'b' { 1 } else { 0 };
                let mut k = s + 1;
                while at(&c, i + k) == '#' {
                    k += 1;
                }
                at(&c, i + k) == '"'
            }
        {
            // Raw string: r"…", r#"…"#, br##"…"##.
            let s = if at(&c, i) == 'b' { 1 } else { 0 };
            let mut hashes = 0;
            while at(&c, i + s + 1 + hashes) == '#' {
                hashes += 1;
            }
            let open = s + 2 + hashes;
            for _ in 0..open {
                out.push(' ');
            }
            i += open;
            while i < c.len() {
                if c[i] == '"' && (0..hashes).all(|h| c.get(i + 1 + h) == Some(&'#')) {
                    for _ in 0..=hashes {
                        out.push(' ');
                    }
                    i += 1 + hashes;
                    break;
                }
                out.push(blank(c[i]));
                i += 1;
            }
        } else if at(&c, i) == '"' {
            out.push(' ');
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' && i + 1 < c.len() {
                    out.push(' ');
                    i += 1;
                }
                out.push(blank(c[i]));
                i += 1;
            }
            out.push(' ');
            i += 1;
        } else if at(&c, i) == '\'' && (at(&c, i + 2) == '\'' || at(&c, i + 1) == '\\') {
            // A character literal ('x', '\n', '\'', '\u{1F600}'); a
            // lifetime ('a) has no closing quote right after one char.
            out.push(' ');
            i += 1;
            if at(&c, i) == '\\' {
                out.push(' ');
                i += 1;
            }
            while i < c.len() && c[i] != '\'' {
                out.push(' ');
                i += 1;
            }
            out.push(' ');
            i += 1;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// The character at `i`, or NUL past the end.
fn at(c: &[char], i: usize) -> char {
    c.get(i).copied().unwrap_or('\0')
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Other(char),
}

fn tokens(text: &str) -> Vec<Tok> {
    let c: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if ch.is_alphabetic() || ch == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            out.push(Tok::Ident(c[start..i].iter().collect()));
            continue;
        }
        if ch.is_numeric() {
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            continue;
        }
        i += 1;
        match ch {
            ':' if c.get(i) == Some(&':') => {
                i += 1;
                out.push(Tok::PathSep);
            }
            '{' => out.push(Tok::Open),
            '}' => out.push(Tok::Close),
            ',' => out.push(Tok::Comma),
            c if c.is_whitespace() => {}
            c => out.push(Tok::Other(c)),
        }
    }
    out
}

/// Reads the path (or `use` tree) starting at `toks[i]` and appends every
/// full path it names to `out`. Returns the index after it.
fn read_tree(toks: &[Tok], mut i: usize, prefix: &[String], out: &mut Vec<Vec<String>>) -> usize {
    let mut path = prefix.to_vec();
    loop {
        match toks.get(i) {
            Some(Tok::Ident(s)) => {
                path.push(s.clone());
                i += 1;
                if toks.get(i) == Some(&Tok::PathSep) {
                    i += 1;
                    continue;
                }
                out.push(path);
                return i;
            }
            Some(Tok::Open) => {
                i += 1;
                loop {
                    match toks.get(i) {
                        Some(Tok::Close) => return i + 1,
                        Some(Tok::Comma) => i += 1,
                        None => return i,
                        Some(_) => {
                            let next = read_tree(toks, i, &path, out);
                            i = if next == i { i + 1 } else { next };
                        }
                    }
                }
            }
            // `use a::*` (glob) or a path that ends in `::<` turbofish.
            _ => {
                out.push(path);
                return i;
            }
        }
    }
}

/// Every module-level path a file names, resolved relative to the crate
/// root (`self`/`super` and child-module paths made absolute).
fn referenced_paths(src: &Source, all: &BTreeSet<Module>, binary: bool) -> Vec<Vec<String>> {
    let toks = tokens(&strip(&src.text));
    let is_child = |name: &str| {
        let mut m = src.module.clone();
        m.push(name.to_owned());
        all.contains(&m)
    };
    // Inline modules (`mod tests { … }`): `super` inside one stays in this
    // file's module.
    let mut inline: Vec<usize> = Vec::new();
    let mut depth = 0usize;
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Open => depth += 1,
            Tok::Close => {
                depth = depth.saturating_sub(1);
                if inline.last() == Some(&depth) {
                    inline.pop();
                }
            }
            Tok::Ident(kw)
                if kw == "mod"
                    && matches!(toks.get(i + 1), Some(Tok::Ident(_)))
                    && toks.get(i + 2) == Some(&Tok::Open) =>
            {
                inline.push(depth);
                depth += 1;
                i += 3;
                continue;
            }
            Tok::Ident(first) => {
                let prev_is_path = i > 0
                    && (matches!(toks[i - 1], Tok::PathSep | Tok::Other('$'))
                        || toks[i - 1] == Tok::Ident("in".into()));
                let starts = toks.get(i + 1) == Some(&Tok::PathSep)
                    && !prev_is_path
                    && (matches!(first.as_str(), "crate" | "super" | "self")
                        || (binary && first == "derpd")
                        || (!binary && is_child(first)));
                if starts {
                    let mut paths = Vec::new();
                    let next = read_tree(&toks, i, &[], &mut paths);
                    for p in paths {
                        if let Some(abs) = absolute(src, &p, inline.len(), binary) {
                            out.push(abs);
                        }
                    }
                    i = next.max(i + 1);
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// Makes `path` (as written in `src`, inside `inline` nested inline
/// modules) absolute.
fn absolute(src: &Source, path: &[String], inline: usize, binary: bool) -> Option<Vec<String>> {
    let mut segs = path.iter().peekable();
    let mut base: Vec<String>;
    match segs.peek().map(|s| s.as_str()) {
        Some("crate") => {
            segs.next();
            base = Vec::new();
        }
        Some("derpd") if binary => {
            segs.next();
            base = Vec::new();
        }
        Some("self") => {
            segs.next();
            base = src.module.clone();
        }
        Some("super") => {
            base = src.module.clone();
            let mut levels = inline;
            while segs.peek().map(|s| s.as_str()) == Some("super") {
                segs.next();
                if levels > 0 {
                    levels -= 1;
                } else {
                    base.pop()?;
                }
            }
        }
        _ => base = src.module.clone(),
    }
    for s in segs {
        if s != "self" {
            base.push(s.clone());
        }
    }
    Some(base)
}

/// The longest prefix of `path` that is a module with a file of its own.
fn owning_module(path: &[String], all: &BTreeSet<Module>) -> Module {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|m| all.contains(m))
        .unwrap_or_default()
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

/// The import graph: file → the files it names (never itself, never the
/// crate root, which only declares modules).
struct Graph {
    files: BTreeMap<Module, String>,
    edges: BTreeMap<Module, BTreeSet<Module>>,
    /// Per file: each module it names, with one path naming it (for
    /// messages).
    named: BTreeMap<String, BTreeMap<Module, String>>,
}

fn graph() -> Graph {
    let srcs = sources();
    let all: BTreeSet<Module> = srcs.iter().map(|s| s.module.clone()).collect();
    let mut g = Graph {
        files: BTreeMap::new(),
        edges: BTreeMap::new(),
        named: BTreeMap::new(),
    };
    for s in &srcs {
        // main.rs is a second crate (the binary) whose root is not lib.rs.
        let binary = s.file == "main.rs";
        let from = if binary {
            vec!["main".to_owned()]
        } else {
            s.module.clone()
        };
        if s.file == "lib.rs" {
            continue;
        }
        g.files.insert(from.clone(), s.file.clone());
        let named = g.named.entry(s.file.clone()).or_default();
        for p in referenced_paths(s, &all, binary) {
            let to = owning_module(&p, &all);
            named.entry(to.clone()).or_insert_with(|| p.join("::"));
            if to != from && !to.is_empty() {
                g.edges.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    g
}

/// Strongly connected components with more than one member (Tarjan).
fn cycles(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct State<'a> {
        edges: &'a BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<Module, usize>,
        low: BTreeMap<Module, usize>,
        stack: Vec<Module>,
        on_stack: BTreeSet<Module>,
        next: usize,
        out: Vec<Vec<Module>>,
    }
    fn visit(s: &mut State, v: &Module) {
        s.index.insert(v.clone(), s.next);
        s.low.insert(v.clone(), s.next);
        s.next += 1;
        s.stack.push(v.clone());
        s.on_stack.insert(v.clone());
        let succ: Vec<Module> = s.edges.get(v).into_iter().flatten().cloned().collect();
        for w in succ {
            if !s.index.contains_key(&w) {
                visit(s, &w);
                let l = s.low[v].min(s.low[&w]);
                s.low.insert(v.clone(), l);
            } else if s.on_stack.contains(&w) {
                let l = s.low[v].min(s.index[&w]);
                s.low.insert(v.clone(), l);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = s.stack.pop().expect("on stack");
                s.on_stack.remove(&w);
                let done = &w == v;
                comp.push(w);
                if done {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    let nodes: BTreeSet<Module> = edges
        .iter()
        .flat_map(|(k, v)| std::iter::once(k.clone()).chain(v.iter().cloned()))
        .collect();
    for v in &nodes {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

fn describe(edges: &BTreeMap<Module, BTreeSet<Module>>, comp: &[Module]) -> String {
    let set: BTreeSet<&Module> = comp.iter().collect();
    let mut lines = Vec::new();
    for from in comp {
        for to in edges.get(from).into_iter().flatten() {
            if set.contains(to) {
                lines.push(format!("    {} -> {}", name(from), name(to)));
            }
        }
    }
    lines.join("\n")
}

/// The graph between the direct children of `parent` (`parent = []`: the
/// top-level modules): every file strictly below `parent` stands for the
/// child it lies under, and edges inside one child are dropped. `parent`'s
/// own file (its `mod.rs`) is not a node: a module may use its children and
/// they may use it, since it contains them.
fn children_graph(g: &Graph, parent: &Module) -> BTreeMap<Module, BTreeSet<Module>> {
    let child = |m: &Module| -> Option<Module> {
        (m.len() > parent.len() && m.starts_with(parent)).then(|| m[..=parent.len()].to_vec())
    };
    let mut out: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (from, tos) in &g.edges {
        let Some(a) = child(from) else { continue };
        for to in tos {
            match child(to) {
                Some(b) if b != a => {
                    out.entry(a.clone()).or_default().insert(b);
                }
                _ => {}
            }
        }
    }
    out
}

/// Every module that has children (the crate root included).
fn parents(g: &Graph) -> BTreeSet<Module> {
    g.files
        .keys()
        .flat_map(|m| (0..m.len()).map(move |n| m[..n].to_vec()))
        .collect()
}

#[test]
fn the_parser_understands_use_trees_comments_and_strings() {
    let text = "//! crate::nope in a doc comment\n\
        use crate::{a, b::{c, d::E}, f::{self, G}};\n\
        use super::h::I; /* crate::nope */\n\
        fn x() { let s = \"crate::nope\"; let c = '\"'; q::r(); crate::j::k(); }\n\
        macro_rules! m { () => { $crate::nope::X } }\n\
        pub(in crate::l) struct S;\n\
        #[cfg(test)] mod tests { use super::*; use super::super::m::N; }\n";
    let src = Source {
        file: "p/z.rs".into(),
        module: vec!["p".into(), "z".into()],
        text: text.into(),
    };
    let all: BTreeSet<Module> = [vec!["p".to_owned(), "z".to_owned(), "q".to_owned()]]
        .into_iter()
        .collect();
    let got: Vec<String> = referenced_paths(&src, &all, false)
        .iter()
        .map(|p| p.join("::"))
        .collect();
    assert_eq!(
        got,
        [
            "a",
            "b::c",
            "b::d::E",
            "f",
            "f::G",
            "p::h::I",
            "p::z::q::r",
            "j::k",
            "p::z",
            "p::m::N",
        ]
        .map(String::from)
    );
}

/// No cycles between the top-level modules, nor between the files and
/// folders inside any module (`companion/admission.rs` ↔
/// `companion/metrics.rs` is a cycle; `relay/mod.rs` using `relay/reader.rs`
/// which uses `relay/mod.rs` is a module using its own child, not a cycle).
#[test]
fn there_are_no_import_cycles() {
    let g = graph();
    assert!(g.files.len() > 40, "the sources were found");
    let mut found = Vec::new();
    for parent in parents(&g) {
        let edges = children_graph(&g, &parent);
        for c in cycles(&edges) {
            found.push(format!(
                "  in {}: {}\n{}",
                name(&parent),
                c.iter().map(name).collect::<Vec<_>>().join(", "),
                describe(&edges, &c)
            ));
        }
    }
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

#[test]
fn there_are_no_import_cycles_between_top_level_modules() {
    let g = graph();
    let found = cycles(&children_graph(&g, &Vec::new()));
    assert!(
        found.is_empty(),
        "cycles between top-level modules: {found:?}"
    );
}

#[test]
fn the_relay_core_names_no_mesh_type() {
    let g = graph();
    let bad: Vec<String> = g
        .named
        .iter()
        .filter(|(file, _)| file.starts_with("relay/"))
        .flat_map(|(file, named)| {
            named
                .iter()
                .filter(|(m, _)| m.first().is_some_and(|s| s == "mesh"))
                .map(move |(_, p)| format!("{file} names {p}"))
        })
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn only_the_top_level_names_config() {
    let g = graph();
    let top = |f: &str| f == "main.rs" || f == "server.rs" || f.starts_with("config");
    let bad: Vec<String> = g
        .named
        .iter()
        .filter(|(file, _)| !top(file))
        .flat_map(|(file, named)| {
            named
                .iter()
                .filter(|(m, _)| m.first().is_some_and(|s| s == "config"))
                .map(move |(_, p)| format!("{file} names {p}"))
        })
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
}

/// The prober is a client of the protocol (like the tunnel): it builds on
/// `proto`, `client`, `stun` (the client side of the codec) and `trust`,
/// never on the relay side (`relay`, `mesh`, `http`, `companion`, `tls`,
/// `server`, `config`) nor on the tunnel or the benchmark; and nothing but
/// the binary (`main.rs`) names it.
#[test]
fn the_prober_is_a_client_and_only_the_top_level_names_it() {
    let g = graph();
    let server_side = [
        "relay",
        "mesh",
        "http",
        "companion",
        "tls",
        "server",
        "config",
        "tunnel",
        "bench",
    ];
    let mut bad: Vec<String> = Vec::new();
    for (file, named) in &g.named {
        for (m, p) in named {
            let Some(top) = m.first() else { continue };
            if file.starts_with("prober/") && server_side.contains(&top.as_str()) {
                bad.push(format!("{file} names {p}"));
            }
            if top == "prober" && !file.starts_with("prober/") && file != "main.rs" {
                bad.push(format!("{file} names {p}"));
            }
        }
    }
    assert!(
        g.files
            .keys()
            .any(|m| m.first().is_some_and(|s| s == "prober")),
        "the prober's sources were found"
    );
    assert!(bad.is_empty(), "{bad:#?}");
}
