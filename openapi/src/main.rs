//! Writes the OpenAPI document generated from the API's handlers to `openapi/openapi.json`,
//! or with `--check` fails when the committed document differs from the generated one.

use anyhow::{Context, bail};
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let check = std::env::args().any(|a| a == "--check");
    // `cargo run` sets CARGO_MANIFEST_DIR for the process too: the checkout it runs in, even
    // when the binary was built (into the shared target directory) from another clone.
    let package = std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    let path = package.join("openapi.json");
    let generated = format!("{}\n", serde_json::to_string_pretty(&api::openapi())?);
    if check {
        let committed = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        if committed != generated {
            bail!("{} is stale: run `cargo run -p openapi` and commit the result", path.display());
        }
        println!("{} is up to date", path.display());
    } else {
        std::fs::write(&path, generated).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
