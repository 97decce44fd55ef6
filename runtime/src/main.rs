//! The `usm` command.

fn main() {
    eprintln!("usm: no subcommands yet");
    std::process::exit(2);
}
