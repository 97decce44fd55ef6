//! `usm completions SHELL` and `usm man`: shell completions (`clap_complete`) and manual
//! pages (`clap_mangen`) generated from the command-line definition itself, so they never
//! drift from it. `scripts/install` puts them where shells and `man` look.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

/// Writes `bytes` on stdout; a reader that went away (`usm man | head`) is not an error
/// worth a message.
fn to_stdout(bytes: &[u8]) -> Result<(), String> {
    match std::io::stdout().lock().write_all(bytes) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(format!("cannot write to stdout: {e}")),
    }
}

/// Writes the completion script of `shell` for `cmd` on stdout.
pub(crate) fn completions(mut cmd: clap::Command, shell: clap_complete::Shell) -> ExitCode {
    let name = cmd.get_name().to_owned();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut script);
    match to_stdout(&script) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usm: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes the manual page of `cmd` (section 1) on stdout; with `dir`, writes one page per
/// command and subcommand there instead (`usm.1`, `usm-exec.1`, ...).
pub(crate) fn man(cmd: clap::Command, dir: Option<&Path>) -> ExitCode {
    let result = match dir {
        Some(dir) => std::fs::create_dir_all(dir)
            .and_then(|()| clap_mangen::generate_to(cmd, dir))
            .map_err(|e| format!("cannot write the manual pages to {}: {e}", dir.display())),
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut page)
                .map_err(|e| format!("cannot render the manual page: {e}"))
                .and_then(|()| to_stdout(&page))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usm: {e}");
            ExitCode::FAILURE
        }
    }
}
