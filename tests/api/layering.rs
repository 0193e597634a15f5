//! The floors of `src/`: the numbered list under `# Floors` in `src/lib.rs` says which top-level
//! module stands on which floor, and no module may name a module on its own floor or above (its
//! own folder excepted). That keeps `src/` free of import cycles between folders, which the
//! compiler allows inside one crate.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// `module -> floor`, read from the `//! N. `a`, `b`: ...` lines under `//! # Floors`.
fn floors(lib_rs: &str) -> BTreeMap<String, usize> {
    let mut floors = BTreeMap::new();
    let mut in_section = false;
    for line in lib_rs.lines() {
        let Some(doc) = line.strip_prefix("//!") else {
            continue;
        };
        let doc = doc.trim();
        if let Some(heading) = doc.strip_prefix('#') {
            in_section = heading.trim() == "Floors";
            continue;
        }
        if !in_section {
            continue;
        }
        let Some((number, rest)) = doc.split_once(". ") else {
            continue;
        };
        let Ok(floor) = number.parse::<usize>() else {
            continue;
        };
        let names = rest.split(':').next().unwrap_or("");
        for name in names.split(',') {
            let name = name.trim().trim_matches('`');
            assert!(!name.is_empty(), "an empty module name on floor {floor}");
            assert!(
                floors.insert(name.to_string(), floor).is_none(),
                "`{name}` is named on two floors"
            );
        }
    }
    floors
}

/// Every top-level module a file names through `crate::`: in `use` trees, in paths of code and
/// types, and in the tokens of macro calls (`log::info!` arguments are not parsed as code).
#[derive(Default)]
struct CrateNames(BTreeSet<String>);

impl CrateNames {
    fn tokens(&mut self, tokens: TokenStream) {
        let mut previous: Vec<String> = Vec::new();
        for tree in tokens {
            match tree {
                TokenTree::Group(group) => {
                    // `crate::{a, b}` inside a macro: the group's first names follow `crate::`.
                    if previous.ends_with(&["crate".into(), ":".into(), ":".into()]) {
                        for item in group.stream().to_string().split(',') {
                            if let Some(name) = item.split("::").next() {
                                self.0.insert(name.trim().to_string());
                            }
                        }
                    }
                    self.tokens(group.stream());
                    previous.clear();
                }
                TokenTree::Ident(ident) => {
                    let ident = ident.to_string();
                    if previous.ends_with(&["crate".into(), ":".into(), ":".into()]) {
                        self.0.insert(ident.clone());
                    }
                    previous.push(ident);
                }
                TokenTree::Punct(punct) => previous.push(punct.as_char().to_string()),
                TokenTree::Literal(_) => previous.clear(),
            }
        }
    }

    fn use_tree(&mut self, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(path) => self.0.insert(path.ident.to_string()),
            syn::UseTree::Name(name) => self.0.insert(name.ident.to_string()),
            syn::UseTree::Rename(rename) => self.0.insert(rename.ident.to_string()),
            syn::UseTree::Group(group) => {
                for tree in &group.items {
                    self.use_tree(tree);
                }
                true
            }
            syn::UseTree::Glob(_) => panic!("`use crate::*` hides which floors a module uses"),
        };
    }
}

impl<'ast> Visit<'ast> for CrateNames {
    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        if let syn::UseTree::Path(path) = &item.tree
            && path.ident == "crate"
        {
            self.use_tree(&path.tree);
        }
        syn::visit::visit_item_use(self, item);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let mut segments = path.segments.iter();
        if let (Some(first), Some(second)) = (segments.next(), segments.next())
            && first.ident == "crate"
        {
            self.0.insert(second.ident.to_string());
        }
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.tokens(mac.tokens.clone());
        syn::visit::visit_macro(self, mac);
    }
}

fn rust_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to: `src/proxy/keys.rs` -> `proxy`.
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).expect("under src");
    let first = relative.components().next().expect("a component");
    first
        .as_os_str()
        .to_string_lossy()
        .trim_end_matches(".rs")
        .to_string()
}

#[test]
fn no_module_names_its_own_floor_or_one_above() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib_rs = std::fs::read_to_string(src.join("lib.rs")).expect("read lib.rs");
    let floors = floors(&lib_rs);
    assert!(
        floors.len() >= 5,
        "src/lib.rs should list the floors under `# Floors`"
    );

    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut problems = Vec::new();
    let mut modules_seen = BTreeSet::new();
    for file in files {
        let module = module_of(&src, &file);
        // The binary's entry point and the crate root stand above every floor.
        if module == "main" || module == "lib" {
            continue;
        }
        modules_seen.insert(module.clone());
        let Some(&floor) = floors.get(&module) else {
            problems.push(format!(
                "{}: module `{module}` is on no floor in src/lib.rs",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("read a source file");
        let parsed = syn::parse_file(&text)
            .unwrap_or_else(|error| panic!("{} does not parse: {error}", file.display()));
        let mut names = CrateNames::default();
        names.visit_file(&parsed);
        for name in names.0 {
            if name == module || name == "self" || name == "super" {
                continue;
            }
            match floors.get(&name) {
                Some(&other) if other < floor => {}
                Some(&other) => problems.push(format!(
                    "{}: `{module}` (floor {floor}) names `crate::{name}` (floor {other})",
                    file.display()
                )),
                // A crate-root re-export or macro; `lib.rs` itself stands above every floor.
                None => problems.push(format!(
                    "{}: `{module}` names `crate::{name}`, which is on no floor",
                    file.display()
                )),
            }
        }
    }
    for listed in floors.keys() {
        assert!(
            modules_seen.contains(listed),
            "src/lib.rs lists `{listed}`, which is not a module of src/"
        );
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_floor_check_sees_every_way_of_naming_a_module() {
    let file = syn::parse_file(
        r#"
        use crate::{alpha::A, beta};
        use crate::gamma as g;
        fn f() -> crate::delta::D {
            log::info!("{}", crate::epsilon::x());
            matches!(x, crate::{zeta::Z})
        }
        "#,
    )
    .expect("parses");
    let mut names = CrateNames::default();
    names.visit_file(&file);
    let expected: BTreeSet<String> = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(names.0, expected);
    let floors = floors(
        "//! # Floors\n//!\n//! 1. `a`, `b`: leaves\n//! 2. `c`: above\n//! # Next\n//! 3. `d`: not a floor",
    );
    assert_eq!(floors.get("a"), Some(&1));
    assert_eq!(floors.get("b"), Some(&1));
    assert_eq!(floors.get("c"), Some(&2));
    assert_eq!(floors.get("d"), None);
}
