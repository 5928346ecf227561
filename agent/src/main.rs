//! `mdm-agent`: the device side. Enrollment and the command stream are
//! built on the foundation this binary ships with.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "mdm-agent", version, about = "MDM device agent")]
struct Cli {}

fn main() {
    let Cli {} = Cli::parse();
}
