//! `teal run --interactive` end to end on the real SmolLM2 file (skips when it is not cached,
//! unless TEAL_REQUIRE_ASSETS=1): one conversation over lines of standard input, each turn
//! reusing the cached conversation, `/clear` starting over, and the first answer equal to
//! `teal run --chat` on the same message; the prompt read from a file (`-f`)
//! and `--no-display-prompt`.

mod common;

use common::smollm2;
use std::io::Write;
use std::process::{Command, Output, Stdio};

fn teal(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_teal"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "teal {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `prompt: N tokens (C cached)` figures of each turn's statistics line.
fn prompt_stats(stderr: &str) -> Vec<(usize, usize)> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("prompt: "))
        .map(|l| {
            let n = l.split(' ').next().unwrap().parse().unwrap();
            let cached = l
                .split_once(" tokens (")
                .map_or(0, |(_, r)| r.split(' ').next().unwrap().parse().unwrap());
            (n, cached)
        })
        .collect()
}

#[test]
fn interactive_turns_reuse_the_conversation() {
    let Some(model) = smollm2() else { return };
    let m = model.to_str().unwrap();
    let common = [
        "run", "-m", m, "--temp", "0", "-n", "40", "-c", "512", "-t", "2",
    ];
    let once = teal(
        &[&common[..], &["--chat", "-p", "What is 2+2?"]].concat(),
        "",
    );
    let answer = String::from_utf8(once.stdout).unwrap();

    let chat = teal(
        &[&common[..], &["-i", "-p", "What is 2+2?"]].concat(),
        "And 3+3?\n\n/clear\nWhat is 2+2?\n",
    );
    let out = String::from_utf8(chat.stdout).unwrap();
    let err = String::from_utf8(chat.stderr).unwrap();
    assert!(out.starts_with(&answer), "{out:?} vs {answer:?}");
    assert!(err.contains("(a new conversation)"), "{err}");
    let stats = prompt_stats(&err);
    assert_eq!(stats.len(), 3, "{err}");
    let (first, second, third) = (stats[0], stats[1], stats[2]);
    assert_eq!(first.1, 0);
    // The second turn runs only its own message: the first prompt and answer are cached.
    assert!(second.1 > first.0 && second.1 < second.0, "{stats:?}");
    // After /clear the same first message again: all but its last token cached.
    assert_eq!(third, (first.0, first.0 - 1));
    assert!(out.ends_with(&answer), "{out:?} vs {answer:?}");
}

#[test]
fn run_needs_a_prompt_unless_interactive() {
    let out = Command::new(env!("CARGO_BIN_EXE_teal"))
        .args(["run"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--prompt"), "{err}");
}

#[test]
fn a_prompt_file_is_the_prompt_less_one_newline() {
    let dir = std::env::temp_dir().join(format!("teal-prompt-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("missing.txt");
    let out = Command::new(env!("CARGO_BIN_EXE_teal"))
        .args(["run", "-f", missing.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("prompt file") && err.contains("missing.txt"),
        "{err}"
    );

    let Some(model) = smollm2() else { return };
    let m = model.to_str().unwrap();
    let file = dir.join("prompt.txt");
    std::fs::write(&file, "What is 2+2?\n").unwrap();
    let f = file.to_str().unwrap();
    let common = [
        "run", "-m", m, "--temp", "0", "-n", "16", "-c", "256", "-t", "2",
    ];
    let by_flag = teal(
        &[&common[..], &["--chat", "-p", "What is 2+2?"]].concat(),
        "",
    );
    let by_file = teal(&[&common[..], &["--chat", "-f", f]].concat(), "");
    assert_eq!(by_file.stdout, by_flag.stdout);
    // The file's text is the first message of a conversation too.
    let chat = teal(&[&common[..], &["-i", "-f", f]].concat(), "");
    assert_eq!(chat.stdout, by_flag.stdout);
    // Without a chat the prompt is written before the answer, unless --no-display-prompt.
    let shown = teal(&[&common[..], &["-p", "What is 2+2?"]].concat(), "");
    let bare = teal(
        &[&common[..], &["-f", f, "--no-display-prompt"]].concat(),
        "",
    );
    let shown = String::from_utf8(shown.stdout).unwrap();
    let bare = String::from_utf8(bare.stdout).unwrap();
    assert!(!bare.is_empty());
    assert_eq!(shown, format!("What is 2+2?{bare}"));
    std::fs::remove_dir_all(&dir).unwrap();
}
