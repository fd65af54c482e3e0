//! Training straight from a kohya dataset (`--train_data_dir` folders, `--reg_data_dir`,
//! `--dataset_config`): before training, train-lora runs the preparation tools, its sibling
//! executables, as child processes (each command printed first), into one folder of prepared
//! metadata. Each tool redoes only what changed, so an unchanged dataset costs a few checks;
//! the trainer then reads the metadata and caches they wrote, and never loads the VAE itself
//! (docs/train-lora.md#training-from-a-kohya-dataset).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Error, Result};

/// The metadata prepare-dataset writes into the preparation folder.
pub const DATASET_JSON: &str = "meta_dataset.json";
/// The metadata prepare-latents writes (with the text-encoder cache index beside it); training
/// reads it as its `--in_json`.
pub const LATENTS_JSON: &str = "meta_lat.json";

/// One run of a preparation tool.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolRun {
    /// The executable's name (a sibling of train-lora's).
    pub tool: &'static str,
    /// Its arguments.
    pub args: Vec<OsString>,
}

impl ToolRun {
    /// The command as a shell line (arguments quoted where needed).
    pub fn shell_line(&self) -> String {
        std::iter::once(self.tool.to_string())
            .chain(
                self.args
                    .iter()
                    .map(|arg| shell_quote(&arg.to_string_lossy())),
            )
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The preparation of a kohya dataset for one training command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Preparation {
    /// Folder of the prepared metadata (`<output_dir>/.lorakit/<output_name>-dataset`).
    pub dir: PathBuf,
    /// The tool runs, in order: prepare-dataset, prepare-latents, cache-text-encoder.
    pub runs: Vec<ToolRun>,
}

impl Preparation {
    /// The prepared folder for a run writing `output_name` into `output_dir`.
    pub fn folder(output_dir: &Path, output_name: &str) -> PathBuf {
        output_dir
            .join(crate::formats::bookkeeping::LORAKIT_DIR)
            .join(format!("{output_name}-dataset"))
    }

    /// The metadata training reads.
    pub fn metadata(&self) -> PathBuf {
        self.dir.join(LATENTS_JSON)
    }

    /// Runs every tool in order, printing each command first; stops at the first that fails
    /// (exit code 3, some images skipped, goes on: the tool listed them).
    pub fn run(&self, quiet: bool) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        for run in &self.runs {
            if !quiet {
                eprintln!("train-lora: preparing: {}", run.shell_line());
            }
            let program = sibling_executable(run.tool)?;
            let status = Command::new(&program)
                .args(&run.args)
                .status()
                .map_err(|e| Error::io(&program, e))?;
            match status.code() {
                Some(0) | Some(3) => {}
                code => {
                    return Err(Error::Usage(format!(
                        "{} ended with {}: the dataset is not prepared, so training does not \
                         start (its messages are above)",
                        run.tool,
                        code.map_or("a signal".to_string(), |c| format!("exit code {c}"))
                    )))
                }
            }
        }
        Ok(())
    }

    /// `--no_prepare`: the prepared metadata must already exist (it is trained from as it is);
    /// otherwise the refusal lists the commands that prepare it.
    pub fn check_prepared(&self) -> Result<()> {
        if self.metadata().is_file() {
            return Ok(());
        }
        let commands: Vec<String> = self.runs.iter().map(ToolRun::shell_line).collect();
        Err(Error::Usage(format!(
            "--no_prepare: {} does not exist; prepare the dataset first (or leave out \
             --no_prepare and train-lora runs these itself):\n  {}",
            self.metadata().display(),
            commands.join("\n  ")
        )))
    }
}

/// The path of the tool `name` beside the running executable.
pub(super) fn sibling_executable(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().map_err(|e| Error::io(Path::new("train-lora"), e))?;
    let path = me.with_file_name(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::bad_file(
            &path,
            format!(
                "{name} is not installed beside train-lora; build every tool (make build) or \
                 prepare the dataset by hand and train with --in_json"
            ),
        ))
    }
}

/// `text` quoted for a POSIX shell when it holds anything but safe characters.
fn shell_quote(text: &str) -> String {
    let safe = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c));
    if safe {
        text.to_string()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_print_as_shell_lines_and_no_prepare_lists_them() {
        let dir = tempfile::tempdir().unwrap();
        let preparation = Preparation {
            dir: dir.path().join("prepared"),
            runs: vec![ToolRun {
                tool: "prepare-dataset",
                args: vec!["--train_data_dir".into(), "my img/1_sks dog".into()],
            }],
        };
        let line = preparation.runs[0].shell_line();
        assert_eq!(line, "prepare-dataset --train_data_dir 'my img/1_sks dog'");
        let refusal = preparation.check_prepared().unwrap_err().to_string();
        assert!(
            refusal.contains("--no_prepare") && refusal.contains(&line),
            "{refusal}"
        );
        std::fs::create_dir_all(&preparation.dir).unwrap();
        std::fs::write(preparation.metadata(), "{}").unwrap();
        preparation.check_prepared().unwrap();
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
