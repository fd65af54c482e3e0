//! Data-parallel `train-lora`: processes launched as PyTorch launches its workers (`RANK`,
//! `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), and under `torchrun` itself when the reference
//! Python is there. Two ranks train what one process trains accumulating two batches.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use crate::common;

use common::{fixtures, make_training_caches, reference_python, run, tool};

/// The command line of every run here, writing to `out`.
fn command_line(data: &Path, out: &Path, extra: &[&str]) -> Vec<std::ffi::OsString> {
    let mut args = common::os(&[
        &"--pretrained_model_name_or_path",
        &fixtures().join("sd15-tiny/model.safetensors"),
        &"--in_json",
        &data.join("meta_lat.json"),
        &"--train_data_dir",
        &data,
        &"--output_dir",
        &out,
        &"--output_name",
        &"dp",
        &"--max_train_steps",
        &"3",
        &"--train_batch_size",
        &"1",
        &"--learning_rate",
        &"1e-3",
        &"--seed",
        &"5",
        &"--network_train_unet_only",
        &"--save_state",
        &"--quiet",
    ]);
    args.extend(extra.iter().map(Into::into));
    args
}

/// A free TCP port on this machine.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// Starts rank `rank` of `size` with `args`, the main rank listening on `port`.
fn start_rank(rank: usize, size: usize, port: u16, args: &[std::ffi::OsString]) -> Child {
    Command::new(tool("train-lora"))
        .args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", size.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("LOCAL_WORLD_SIZE", size.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finished(child: Child) -> (i32, String) {
    let Output { status, stderr, .. } = child.wait_with_output().unwrap();
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// The tensor bytes of a safetensors file (header excluded: it holds the start time).
fn tensor_data(path: &Path) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    bytes[8 + header_len..].to_vec()
}

/// The LoRA one process writes accumulating two batches per step (the reference).
fn single_process(data: &Path) -> (tempfile::TempDir, PathBuf) {
    let out = tempfile::tempdir().unwrap();
    let args = command_line(data, out.path(), &["--gradient_accumulation_steps", "2"]);
    let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    common::run_expect("train-lora", &refs, 0);
    let lora = out.path().join("dp.safetensors");
    (out, lora)
}

#[test]
fn two_processes_train_what_one_accumulates_and_refuse_mismatches() {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let (_single, reference) = single_process(data.path());

    let out = tempfile::tempdir().unwrap();
    let args = command_line(data.path(), out.path(), &[]);
    let port = free_port();
    // Rank 1 starts first: it waits for the main rank to listen.
    let member = start_rank(1, 2, port, &args);
    let main = start_rank(0, 2, port, &args);
    let (main, member) = (finished(main), finished(member));
    assert_eq!(main.0, 0, "rank 0: {}", main.1);
    assert_eq!(member.0, 0, "rank 1: {}", member.1);
    assert_eq!(
        tensor_data(&out.path().join("dp.safetensors")),
        tensor_data(&reference),
        "two ranks train the LoRA one process trains accumulating two batches"
    );
    let log = std::fs::read_to_string(out.path().join("dp_loss.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3);

    // A state saved by two ranks resumes only with two.
    let state = out.path().join("dp-state");
    assert!(state.join("train_state.json").is_file());
    let resumed = tempfile::tempdir().unwrap();
    let mut alone = command_line(data.path(), resumed.path(), &[]);
    alone.extend(["--resume".into(), state.into_os_string()]);
    let refs: Vec<&std::ffi::OsStr> = alone.iter().map(|a| a.as_os_str()).collect();
    let output = run("train-lora", &refs);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("resume it with WORLD_SIZE=2"), "{stderr}");

    // Ranks with different command lines stop before training, each saying so.
    let other = tempfile::tempdir().unwrap();
    let port = free_port();
    let main = start_rank(0, 2, port, &command_line(data.path(), other.path(), &[]));
    let member = start_rank(
        1,
        2,
        port,
        &command_line(data.path(), other.path(), &["--learning_rate", "2e-3"]),
    );
    for (rank, (code, stderr)) in [finished(main), finished(member)].into_iter().enumerate() {
        assert_eq!(code, 1, "rank {rank}: {stderr}");
        assert!(
            stderr.contains("the 2 ranks differ"),
            "rank {rank}: {stderr}"
        );
    }
    assert!(!other.path().join("dp.safetensors").exists());
}

/// `torchrun --no-python` launches the ranks (its own store holds MASTER_PORT, the ranks meet on
/// the port after it). Skipped without `LORAKIT_REFERENCE_PYTHON` (with torch).
#[test]
fn torchrun_launches_the_ranks() {
    let Some(python) = reference_python("torch") else {
        eprintln!("skipped: LORAKIT_REFERENCE_PYTHON with torch is not set");
        return;
    };
    let torchrun = python.with_file_name("torchrun");
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let (_single, reference) = single_process(data.path());
    let out = tempfile::tempdir().unwrap();
    let output = Command::new(&torchrun)
        .args(["--no-python", "--nproc_per_node", "2", "--master_port"])
        .arg(free_port().to_string())
        .arg(tool("train-lora"))
        .args(command_line(data.path(), out.path(), &[]))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "torchrun: {stderr}");
    assert_eq!(
        tensor_data(&out.path().join("dp.safetensors")),
        tensor_data(&reference)
    );
}

/// Ctrl-C on rank 1 stops both ranks after the same step; rank 0 saves a state, and the two
/// ranks resumed from it finish with the LoRA of an uninterrupted single process.
#[test]
fn an_interrupt_on_any_rank_saves_a_state_both_resume_from() {
    let data = tempfile::tempdir().unwrap();
    make_training_caches(data.path());
    let long = |out: &Path, extra: &[&str]| {
        let mut args = command_line(data.path(), out, extra);
        args.retain(|a| a != "--save_state" && a != "--quiet");
        let steps = args.iter().position(|a| a == "--max_train_steps").unwrap();
        args[steps + 1] = "20".into();
        args
    };
    let reference = tempfile::tempdir().unwrap();
    let refs = long(reference.path(), &["--gradient_accumulation_steps", "2"]);
    let refs: Vec<&std::ffi::OsStr> = refs.iter().map(|a| a.as_os_str()).collect();
    common::run_expect("train-lora", &refs, 0);

    let out = tempfile::tempdir().unwrap();
    let args = long(out.path(), &["--verbose"]);
    let port = free_port();
    let main = start_rank(0, 2, port, &args);
    let stderr_path = out.path().join("rank1.stderr");
    let member = Command::new(tool("train-lora"))
        .args(&args)
        .envs([
            ("RANK", "1"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
        ])
        .env("MASTER_PORT", port.to_string())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !std::fs::read_to_string(&stderr_path)
        .unwrap_or_default()
        .contains("step 2:")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "training never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    // SAFETY: sends a signal to our own child process.
    unsafe { libc::kill(member.id() as i32, libc::SIGINT) };
    let (main, member) = (finished(main), finished(member));
    let member_stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert_eq!(main.0, 130, "rank 0: {}", main.1);
    assert_eq!(member.0, 130, "rank 1: {member_stderr}");
    assert!(main.1.contains("--resume"), "{}", main.1);
    std::fs::remove_file(&stderr_path).unwrap();
    assert!(!out.path().join("dp.safetensors").exists());

    let mut resumed = long(out.path(), &[]);
    resumed.extend(["--resume".into(), "latest".into()]);
    let port = free_port();
    let (main, member) = (
        start_rank(0, 2, port, &resumed),
        start_rank(1, 2, port, &resumed),
    );
    let (main, member) = (finished(main), finished(member));
    assert_eq!(main.0, 0, "rank 0: {}", main.1);
    assert_eq!(member.0, 0, "rank 1: {}", member.1);
    assert_eq!(
        tensor_data(&out.path().join("dp.safetensors")),
        tensor_data(&reference.path().join("dp.safetensors")),
        "interrupted and resumed ranks differ from one uninterrupted process"
    );
}
