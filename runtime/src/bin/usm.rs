//! The `usm` command (see `usm_runtime::cli`; a `usm` with policies of your own is
//! `usm_runtime::cli::main_with`).

fn main() -> std::process::ExitCode {
    usm_runtime::cli::main()
}
