//! Operations: systemd socket activation, the unit's command line, and a client in a
//! container-like mount namespace.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use crate::support::{wait_until, BoundedOutput, Raw, Server, CLIENT, SERVER};

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The repository's own files (units, default file).
fn repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

#[test]
fn socket_activation_uses_the_inherited_listener_and_leaves_the_socket() {
    assert!(
        have("systemd-socket-activate"),
        "systemd-socket-activate is needed: apt-get install systemd"
    );
    let dir = tempfile::tempdir().unwrap();
    let activated = dir.path().join("activated.sock");
    let own = dir.path().join("own.sock");
    // systemd-socket-activate binds, then execs the server on the first connection with
    // LISTEN_FDS=1 and LISTEN_PID set: the same process, so its pid is the server's.
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&activated)
        .arg(SERVER)
        .arg("--socket")
        .arg(&own)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn systemd-socket-activate");
    // The file appears at bind(), before listen(): wait until it accepts.
    let mut raw = None;
    wait_until("the activation socket", || {
        raw = Raw::try_connect(&activated).ok();
        raw.is_some()
    });
    let mut raw = raw.expect("connected");
    assert_eq!(raw.request("PUT svc.a 1")["rev"], 1);
    assert_eq!(raw.request("GET svc.a")["value"], 1);
    assert!(
        !own.exists(),
        "the server must not bind its own socket when one is passed"
    );
    drop(raw);

    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let mut status = None;
    wait_until("the activated server to exit", || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    assert!(status.unwrap().success(), "exit status {status:?}");
    assert!(
        activated.exists(),
        "an inherited socket belongs to systemd and must not be unlinked"
    );
}

/// `VAR=value` lines of the environment file, commented-out defaults included.
fn default_file_settings() -> Vec<(String, String)> {
    repo_file("packaging/default/nkv")
        .lines()
        .filter_map(|line| line.trim_start_matches('#').split_once('='))
        .filter(|(name, _)| {
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit())
        })
        .map(|(name, value)| (name.to_owned(), value.trim_matches('"').to_owned()))
        .collect()
}

#[test]
fn the_units_command_line_and_environment_file_are_accepted_by_the_binary() {
    let unit = repo_file("systemd/nkv.service");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("nkv.service has ExecStart=");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some("/usr/bin/nkv-server"));
    let help = Command::new(SERVER).arg("--help").bounded_output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let literal_flags: Vec<&str> = words.filter(|w| !w.starts_with('$')).collect();
    for flag in literal_flags.iter().filter(|w| w.starts_with("--")) {
        let name = flag.split('=').next().unwrap();
        assert!(
            help.contains(name),
            "ExecStart flag {name} unknown to nkv-server"
        );
    }

    // Every documented setting, at its documented default, with the unit's flags: the server
    // starts and serves (paths moved into a temp dir).
    let settings = default_file_settings();
    assert!(
        settings.iter().any(|(n, _)| n == "NKV_DATA_DIR"),
        "{settings:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::new_in(dir.path(), &[]);
    let mut command = Command::new(SERVER);
    for (name, value) in &settings {
        match name.as_str() {
            "NKV_SOCKET" | "NKV_DATA_DIR" | "NKV_ARGS" => {}
            "NKV_SOCKET_GROUP" => {}
            _ if name.starts_with("NKV_") => {
                assert!(
                    help.contains(name.as_str()),
                    "{name} is not a server variable"
                );
                command.env(name, value);
            }
            _ => {}
        }
    }
    let mut child = command
        .env("NKV_SOCKET", &server.socket)
        .env("NKV_DATA_DIR", &server.data)
        .args(&literal_flags)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the server on its environment", || {
        std::os::unix::net::UnixStream::connect(&server.socket).is_ok()
    });
    assert_eq!(server.raw().request("HEALTH")["ok"], true);
    child.kill().unwrap();
    child.wait().unwrap();
    server.kill();
}

/// A client in its own mount namespace, where the host's socket directory is bind-mounted at
/// another path, running as `uid` with supplementary `groups`: what a container sees.
fn container_client(host_dir: &Path, uid: u32, groups: &[u32]) -> std::process::Output {
    let inside = host_dir.parent().unwrap().join("container-mnt");
    std::fs::create_dir_all(&inside).unwrap();
    let groups_arg = if groups.is_empty() {
        "--clear-groups".to_owned()
    } else {
        format!(
            "--groups={}",
            groups
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    let script = format!(
        "mount --bind '{host}' '{inside}' && exec setpriv --reuid={uid} --regid={gid} {groups_arg} '{client}' --socket '{inside}/nkv.sock' health",
        host = host_dir.display(),
        inside = inside.display(),
        gid = groups.first().copied().unwrap_or(uid),
        client = CLIENT,
    );
    Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .bounded_output()
        .expect("unshare")
}

#[test]
fn a_container_reaches_the_socket_through_a_mounted_directory_by_group() {
    assert!(
        is_root() && have("unshare") && have("setpriv"),
        "this test needs root, unshare and setpriv (util-linux), as the README says"
    );
    let tmp = tempfile::tempdir().unwrap();
    let host_dir = tmp.path().join("host-nkv");
    std::fs::create_dir_all(&host_dir).unwrap();
    for dir in [tmp.path(), host_dir.as_path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    const GROUP: u32 = 4242;
    let mut server = Server::new_in(&host_dir, &["--socket-group", "4242"]);
    server.spawn_and_wait();

    let admitted = container_client(&host_dir, 4243, &[GROUP]);
    assert!(
        admitted.status.success(),
        "a container user in the socket's group is admitted: {admitted:?}"
    );
    assert_eq!(String::from_utf8_lossy(&admitted.stdout), "ok\n");

    let refused = container_client(&host_dir, 4244, &[]);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("ermission denied"), "{stderr}");

    // The server logged the admitted peer's uid.
    wait_until("the peer's uid in the log", || {
        server.log_text().contains("uid 4243")
    });
    assert!(server.stop().success());
}
