//! Writes the man page and shell completions, generated from the clap
//! definitions of `ally`, into the directory given (for the packages).
//!
//! cargo run --release --example gen-assets -- target/assets

use std::path::PathBuf;

use clap::CommandFactory;
use clap_complete::Shell;

fn main() -> std::io::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/assets".into()),
    );
    std::fs::create_dir_all(&out)?;
    let command = ally::cli::Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut page)?;
    for sub in command.get_subcommands() {
        let name = format!("ally-{}", sub.get_name());
        let sub = sub.clone().name(&*name.clone().leak());
        let mut sub_page = Vec::new();
        clap_mangen::Man::new(sub).render(&mut sub_page)?;
        std::fs::write(out.join(format!("{name}.1")), sub_page)?;
    }
    std::fs::write(out.join("ally.1"), page)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut ally::cli::Cli::command(), "ally", &out)?;
    }
    println!("wrote the man pages and completions to {}", out.display());
    Ok(())
}
