//! Terminal behaviour, through real terminals (tmux) and real shells: completion in bash, zsh
//! and fish, and Ctrl-C during `subscribe` at the interactive prompt.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::support::{wait_until, BoundedOutput, Server, CLIENT};

/// A private tmux server (its own socket name, no configuration) running one command.
///
/// The command runs under `sh`, which writes its exit status to a file once it ends: tmux
/// does not always record a dead pane's status. The shell ignores SIGINT so that Ctrl-C
/// reaches only the command (which inherits that, so it must install its own handler — as
/// nkv-client does — for Ctrl-C to do anything).
struct Tmux {
    name: String,
    status_file: std::path::PathBuf,
}

impl Tmux {
    fn start(command: &str) -> Tmux {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "nkv-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let status_file = std::env::temp_dir().join(format!("{name}.status"));
        let _ = std::fs::remove_file(&status_file);
        let tmux = Tmux {
            name,
            status_file: status_file.clone(),
        };
        let wrapped = format!(
            "sh -c 'trap \"\" INT; {command}; echo $? > {}'",
            status_file.display()
        );
        tmux.run(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            "200",
            "-y",
            "50",
            &wrapped,
        ]);
        tmux.run(&["set-option", "-t", "t", "remain-on-exit", "on"]);
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new("tmux")
            .args(["-L", &self.name, "-f", "/dev/null"])
            .args(args)
            .bounded_output()
            .expect("tmux is needed for the terminal tests (apt-get install tmux)");
        assert!(out.status.success(), "tmux {args:?}: {out:?}");
        out
    }

    fn send(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "t"];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    /// The screen and its scrollback.
    fn screen(&self) -> String {
        let out = self.run(&["capture-pane", "-p", "-t", "t", "-S", "-500"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[track_caller]
    fn wait_for(&self, what: &str, cond: impl Fn(&str) -> bool) {
        let end = std::time::Instant::now() + crate::support::DEADLINE;
        loop {
            let last = self.screen();
            if cond(&last) {
                return;
            }
            assert!(
                std::time::Instant::now() < end,
                "timed out waiting for {what}; screen:\n{last}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The command's exit status once it has ended, as the shell reports it (a command ended
    /// by signal N reads as 128 + N).
    fn exit_status(&self) -> i32 {
        let end = std::time::Instant::now() + crate::support::DEADLINE;
        loop {
            let text = std::fs::read_to_string(&self.status_file).unwrap_or_default();
            if text.ends_with('\n') {
                return text.trim().parse().expect("the shell writes a number");
            }
            assert!(
                std::time::Instant::now() < end,
                "timed out waiting for the terminal's command to exit; screen:\n{}",
                self.screen()
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.status_file);
        let _ = Command::new("tmux")
            .args(["-L", &self.name, "kill-server"])
            .bounded_output();
    }
}

fn lines_after<'a>(screen: &'a str, marker: &str) -> Vec<&'a str> {
    match screen.rfind(marker) {
        Some(at) => screen[at..].lines().skip(1).collect(),
        None => Vec::new(),
    }
}

#[test]
fn ctrl_c_during_subscribe_returns_to_the_prompt() {
    let server = Server::start();
    let mut client = server.client();
    let command = format!("{CLIENT} --socket {}", server.socket.display());
    let term = Tmux::start(&command);
    // tmux drops trailing blanks: the prompt `nkv> ` reads `nkv>`.
    term.wait_for("the prompt", |s| s.contains("nkv>"));
    term.send(&["subscribe t", "Enter"]);
    term.wait_for("the snapshot", |s| s.contains("ready t 0"));
    client.put("t.x", &1).unwrap();
    term.wait_for("the event", |s| s.contains("put t.x 1"));
    term.send(&["C-c"]);
    term.wait_for("the prompt again", |s| {
        lines_after(s, "put t.x 1")
            .iter()
            .any(|l| l.starts_with("nkv>"))
    });
    // The subscription is gone, the session goes on.
    wait_until("the subscriber to leave", || {
        client.server_stats().unwrap().subscribers == 0
    });
    term.send(&["get t.x", "Enter"]);
    term.wait_for("the value", |s| {
        lines_after(s, "nkv> get t.x").first() == Some(&"1")
    });
    term.send(&["quit", "Enter"]);
    assert_eq!(term.exit_status(), 0, "{}", term.screen());
}

#[test]
fn ctrl_c_during_a_one_shot_subscribe_exits_130() {
    let server = Server::start();
    let command = format!("{CLIENT} --socket {} subscribe a", server.socket.display());
    let term = Tmux::start(&command);
    term.wait_for("the snapshot", |s| s.contains("ready a 0"));
    term.send(&["C-c"]);
    assert_eq!(term.exit_status(), 130);
}

/// The completion script for `shell`, written to `dir`.
fn completion_script(shell: &str, dir: &Path, file: &str) -> std::path::PathBuf {
    let out = Command::new(CLIENT)
        .args(["completions", shell])
        .bounded_output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let path = dir.join(file);
    std::fs::write(&path, &out.stdout).unwrap();
    path
}

#[test]
fn bash_completes_subcommands_and_their_options() {
    let dir = tempfile::tempdir().unwrap();
    let script = completion_script("bash", dir.path(), "nkv-client.bash");
    // What bash's programmable completion does on Tab: call the function with the words.
    let probe = format!(
        "source {}\n\
         comp() {{ COMP_WORDS=(\"$@\"); COMP_CWORD=$(( $# - 1 )); COMP_LINE=\"$*\"; COMP_POINT=${{#COMP_LINE}};\n\
           $(complete -p nkv-client | sed 's/.*-F \\([^ ]*\\) .*/\\1/') nkv-client \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\";\n\
           echo \"${{COMPREPLY[*]}}\"; }}\n\
         comp nkv-client wa\n\
         comp nkv-client wait --e\n\
         comp nkv-client watch --n\n\
         comp nkv-client --json get --t\n\
         comp nkv-client completions z\n",
        script.display()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&probe)
        .bounded_output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines,
        [
            "wait watch",
            "--equals",
            "--no-reconnect --no-init",
            "--timeout",
            "zsh"
        ],
        "{text}"
    );
}

#[test]
fn fish_completes_subcommands_and_their_options() {
    let dir = tempfile::tempdir().unwrap();
    let script = completion_script("fish", dir.path(), "nkv-client.fish");
    let out = Command::new("fish")
        .arg("--no-config")
        .arg("-c")
        .arg(format!(
            "source {}; complete -C 'nkv-client wait --e'; complete -C 'nkv-client wa'; \
             complete -C 'nkv-client completions z'; complete -C 'nkv-client completions f'",
            script.display()
        ))
        .bounded_output()
        .expect("fish is needed for the completion test (apt-get install fish)");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let words: Vec<&str> = text
        .lines()
        .map(|l| l.split('\t').next().unwrap_or(""))
        .collect();
    assert_eq!(
        words,
        ["--equals", "wait", "watch", "zsh", "fish"],
        "{text}"
    );
}

#[test]
fn zsh_completes_subcommands_and_their_options() {
    let status = Command::new("zsh").arg("--version").bounded_output();
    assert!(
        status.is_ok_and(|s| s.status.success()),
        "zsh is needed for the completion test (apt-get install zsh)"
    );
    let dir = tempfile::tempdir().unwrap();
    completion_script("zsh", dir.path(), "_nkv-client");
    let bin = Path::new(CLIENT).parent().unwrap();
    let command = format!(
        "env -i TERM=xterm HOME={home} PATH={bin}:/usr/bin:/bin zsh -f -i",
        home = dir.path().display(),
        bin = bin.display()
    );
    let term = Tmux::start(&command);
    term.send(&[
        &format!(
            "fpath=({} $fpath); autoload -U compinit; compinit -u; PS1='zsh> '",
            dir.path().display()
        ),
        "Enter",
    ]);
    term.wait_for("the zsh prompt", |s| s.contains("zsh> "));
    term.send(&["nkv-client wait --e", "Tab"]);
    term.wait_for("--equals completed", |s| {
        s.contains("zsh> nkv-client wait --equals")
    });
    term.send(&["C-u", "nkv-client wa", "Tab"]);
    term.wait_for("the subcommands listed", |s| {
        s.contains("wait   -- Wait until KEY exists") && s.contains("watch  -- Run CMD")
    });
}
