use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Builds `redirect-ebpf` for bpfel-unknown-none with the nightly toolchain and bpf-linker
/// (installed by `cargo xtask setup`), and leaves the object in OUT_DIR for include_bytes.
fn main() -> anyhow::Result<()> {
    let meta = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let pkg = meta
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "redirect-ebpf")
        .ok_or_else(|| anyhow!("redirect-ebpf package not found"))?;
    let root_dir = pkg
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no manifest dir"))?
        .as_str();
    aya_build::build_ebpf(
        [Package {
            name: "redirect-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
