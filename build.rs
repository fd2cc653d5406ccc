//! Builds the eBPF datapath: every `bpf/*.c` entry object with clang-19, then
//! links them into one object with `bpftool gen object`, so that the programs
//! share one set of maps (see bpf/lib/maps.h) without pinning.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const CLANG: &str = "clang-19";
const BPFTOOL: &str = "bpftool";

fn main() {
    let manifest =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let bpf_dir = manifest.join("bpf");
    let lib_dir = bpf_dir.join("lib");

    println!("cargo:rerun-if-changed={}", bpf_dir.display());
    println!("cargo:rerun-if-changed={}", lib_dir.display());
    let mut entries = sources(&bpf_dir, "c");
    entries.sort();
    for f in entries.iter().chain(sources(&lib_dir, "h").iter()) {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    if entries.is_empty() {
        fail(&format!(
            "no eBPF entry programs (*.c) found in {}",
            bpf_dir.display()
        ));
    }

    // The UAPI headers include <asm/types.h>, which Debian keeps under the
    // multiarch directory of the host, not the BPF target.
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let multiarch = format!("/usr/include/{arch}-linux-gnu");

    let mut objects = Vec::new();
    for src in &entries {
        let stem = src.file_stem().and_then(|s| s.to_str()).unwrap_or("prog");
        let obj = out.join(format!("{stem}.bpf.o"));
        let mut cmd = Command::new(CLANG);
        cmd.args([
            "-O2", "-g", "-Wall", "-Werror", "-target", "bpfel", "-mcpu=v3",
        ])
        .arg("-I/usr/include")
        .arg(format!("-I{multiarch}"))
        .arg(format!("-I{}", lib_dir.display()))
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(&obj);
        run(
            &mut cmd,
            CLANG,
            "install clang-19 (Debian/Ubuntu: apt-get install clang-19 libbpf-dev)",
        );
        objects.push(obj);
    }

    let linked = out.join("veil.bpf.o");
    let mut cmd = Command::new(BPFTOOL);
    cmd.args(["gen", "object"]).arg(&linked).args(&objects);
    run(
        &mut cmd,
        BPFTOOL,
        "install bpftool (Debian/Ubuntu: apt-get install bpftool)",
    );
}

fn sources(dir: &Path, ext: &str) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == ext))
            .collect(),
        Err(e) => fail(&format!("cannot read {}: {e}", dir.display())),
    }
}

fn run(cmd: &mut Command, tool: &str, hint: &str) {
    match cmd.output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => fail(&format!(
            "{cmd:?} failed ({}):\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => fail(&format!(
            "`{tool}` not found in PATH; it is needed to build the eBPF datapath: {hint}"
        )),
        Err(e) => fail(&format!("cannot run {tool}: {e}")),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    panic!("building the eBPF datapath failed: {msg}");
}
