//! The `ganfit` command line: fits photos and manages the model files the fit needs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ganfit",
    version,
    about = "Textured 3D faces from photos (GANFIT)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fit a 3D face to one or more photos of one person and write meshes, textures and renders.
    Fit {
        /// Photos of one person (PNG, JPEG, TIFF, WebP, BMP).
        #[arg(required = true)]
        photos: Vec<PathBuf>,
        /// Folder the results are written to.
        #[arg(long, default_value = "out")]
        out: PathBuf,
    },
    /// Show where every model file resolves, or fetch and verify the ones named.
    Assets {
        /// Asset ids to resolve (default: list all).
        ids: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let chain: Vec<String> = err.chain().map(ToString::to_string).collect();
            eprintln!("error: {}", chain.join(": "));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Fit { photos, out } => fit(&photos, &out),
        Command::Assets { ids } => assets(&ids),
    }
}

fn fit(photos: &[PathBuf], _out: &std::path::Path) -> anyhow::Result<()> {
    for photo in photos {
        anyhow::ensure!(
            photo.is_file(),
            "cannot read photo {}: no such file",
            photo.display()
        );
    }
    anyhow::bail!(
        "fitting is not available in this build yet: the optimiser that fits the morphable model, \
         texture, camera and light to a photo is still being written (see the project's issue \
         'The GANFIT fit'); `ganfit assets` already shows and fetches the models it will use"
    )
}

fn assets(ids: &[String]) -> anyhow::Result<()> {
    let resolver = ganfit::assets::Resolver::new();
    if ids.is_empty() {
        let report = ganfit::asset_report(&resolver);
        if report.is_empty() {
            println!("weights-manifest.toml lists no assets yet");
        }
        for (entry, found) in report {
            match found {
                Ok(path) => println!("{:<32} {:<12} {}", entry.id, entry.license, path.display()),
                Err(err) => println!("{:<32} {:<12} missing: {err}", entry.id, entry.license),
            }
        }
        return Ok(());
    }
    for id in ids {
        let path = resolver.resolve(id)?;
        println!("{id}: {}", path.display());
    }
    Ok(())
}
