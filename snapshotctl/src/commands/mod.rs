//! One module per subcommand; each prints its output to stdout and returns
//! an error when anything failed.

pub mod forget;
pub mod list;
pub mod pin;
pub mod prune;
pub mod rebase;
pub mod show;

use crate::cli::Output;
use serde::Serialize;

/// Prints `value` as pretty JSON on stdout.
fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints the table then the summary (table output), or `json` (JSON output).
fn print(output: Output, table: &str, summary: &str, json: &impl Serialize) -> anyhow::Result<()> {
    match output {
        Output::Table => {
            print!("{table}");
            println!("{summary}");
            Ok(())
        }
        Output::Json => print_json(json),
    }
}
