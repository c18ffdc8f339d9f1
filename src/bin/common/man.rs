//! The man pages of both binaries: clap_mangen's sections for the name, synopsis, description
//! and options, then sections written here that clap does not know: COMMANDS (without the
//! per-command pages clap would point to, which do not exist), ENVIRONMENT (from the flags'
//! variables), EXIT STATUS, and SEE ALSO naming only pages that are shipped.

use std::io::{self, Write};

/// What a page adds to clap's sections.
pub struct Page {
    /// Environment variables that are not a flag's: name, meaning.
    pub environment: &'static [(&'static str, &'static str)],
    pub exit_status: &'static [(&'static str, &'static str)],
    /// Further sections: title, paragraphs.
    pub sections: &'static [(&'static str, &'static [&'static str])],
    pub see_also: &'static str,
}

#[allow(dead_code)]
pub const CLIENT: Page = Page {
    environment: &[(
        "NO_COLOR",
        "Has no effect: nkv-client prints no colour.",
    )],
    exit_status: &[
        ("0", "Success; put --session ended by SIGINT or SIGTERM; with --no-reconnect, subscribe or watch ended because the server stopped (it sent a shutdown event)."),
        ("1", "The key (or, for a session, some key) was not found; wait timed out (the key did not come, or the server accepted but did not answer, or did not come back, within --timeout)."),
        ("2", "Any other error: the server could not be reached or refused the request, bad usage; with --no-reconnect, the connection was lost (for wait: or the server stopped). A session exits with the worst status of its commands."),
        ("3", "A compare-and-set (put --if-rev, delete --if-rev) found the key at another revision; nothing changed. The message on stderr names the key's current revision (0: it does not exist)."),
        ("130", "Interrupted by Ctrl-C (SIGINT) while following events (subscribe, wait, watch); 143 for SIGTERM."),
    ],
    sections: &[(
        "SESSIONS",
        &[
            "With no command, nkv-client reads commands from standard input, one per line, written as on the command line (get KEY, put KEY VALUE, ...), plus help and quit. At a terminal it prompts and offers line editing; Ctrl-C during subscribe, wait or watch returns to the prompt. A put value is the rest of the line as typed: everything after the one space that follows the key, leading and trailing spaces kept (a -- right after that space only ends the flags when something follows it). When the server restarts, the session reconnects; a request that cannot have reached the server is sent again, a put or delete that may have been applied is reported as failed instead.",
        ],
    ), (
        "RESUMING",
        &[
            "subscribe, wait and watch survive the server: when the connection is lost (a restart, the socket file replaced, the server's shutdown event) they reconnect, backing off from 10 ms to 1 s between attempts for as long as it takes (wait: until --timeout), and resume after the last revision they had. subscribe then prints only the changes it missed, deleted keys as del, and ready. When the server's history does not reach back (a crash, more deletes than --tombstones) it prints reset SUB, every key again as init (even one it printed at the same revision: revisions may have started again), del for each key it had printed that is gone (with --json, {\"event\":\"del\",\"key\":K,\"rev\":0}: the delete's revision is unknown), then ready. The shutdown event is not printed. watch runs CMD for each change passed on; after a reset it runs for every key as init, even with --no-init (which skips the first snapshot only), and for each gone key as del with NKV_REV=0. Losing and regaining the connection is told on stderr. --no-reconnect keeps the behaviour from before resuming: subscribe prints shutdown and exits 0 when the server stops and exits 2 when the connection is lost; wait exits 2 in both cases; watch exits 0 and 2.",
        ],
    ), (
        "COMPARE-AND-SET AND SESSION KEYS",
        &[
            "put --if-rev N KEY VALUE stores only if KEY is at revision N (0: only if KEY does not exist); delete --if-rev N KEY deletes only at revision N (--if-rev 0 of a missing key is not found, exit 1). A conflict changes nothing and exits 3 with a message naming the current revision; --json prints the server's conflict line. get --json shows a key's rev.",
            "put --session KEY VALUE stores a session key, kept in memory and owned by the command's connection, and keeps that connection open, printing nothing, until SIGINT or SIGTERM: it then exits 0, and the server deletes the key (subscribers get a del); a killed nkv-client loses it the same way. When the server restarts (the key is gone with the connection) it reconnects and puts the key again, saying so on stderr. In a session, put --session does not block: the key lives as long as the session's connection.",
        ],
    ), (
        "VALUES",
        &[
            "Values are printed, dumped and handed to watch exactly as the server stores them (strings printed raw by get and subscribe): a number keeps all its digits and its spelling (12345678901234567890123, 1e2), an object keeps its key order and any duplicate keys, any depth the server accepts is read. put sends a value that is JSON as typed (only whitespace outside strings removed), so dump followed by restore reproduces the store.",
            "put KEY VALUE...: every word after KEY is the value, even --help, -h, --json, --timeout or --; flags go before the key. A -- right after the key followed by more words only ends the flags (put k -- --json stores \"--json\").",
            "wait --equals JSON: the key's value equals JSON when their texts are the same once whitespace outside strings is removed. So 1 is not 1.0 nor 1e0, numbers are compared digit by digit (however large), and {\"a\":1,\"b\":2} is not {\"b\":2,\"a\":1}. A --equals that is not JSON is the string it spells.",
            "watch: NKV_VALUE holds the value's JSON text when it is at most 131008 bytes. A longer value does not fit in one environment string (Linux's 128 KiB limit); then NKV_VALUE is unset and NKV_VALUE_FILE names a private temporary file holding the text, removed when CMD ends. A CMD that fails, or that cannot be started for one change, is reported and the watch goes on; only a CMD that does not exist or may not be run ends it (exit 2).",
            "dump [PREFIX]: PREFIX and the keys below it; a pattern (*, a.*) dumps the keys it matches.",
        ],
    )],
    see_also: "nkv-server(1)",
};

#[allow(dead_code)]
pub const SERVER: Page = Page {
    environment: &[
        ("RUST_LOG", "Log filter (error, warn, info, debug; default info). At debug, each request is logged with its verb, key and outcome, never its value."),
        ("NOTIFY_SOCKET", "Set by systemd (Type=notify): READY=1 is sent once the socket accepts, STOPPING=1 at shutdown. A name starting with @ is an abstract socket."),
        ("LISTEN_FDS, LISTEN_PID", "Set by systemd socket activation: the listening socket is inherited and --socket, --socket-mode and --socket-group are ignored (and logged as such)."),
    ],
    exit_status: &[
        ("0", "Stopped by SIGTERM or SIGINT after an orderly shutdown."),
        ("1", "Could not start: bad setting, data directory unusable or locked, socket in use or not provably stale."),
        ("2", "Bad usage (unknown flag, malformed value)."),
    ],
    sections: &[(
        "SIGNALS",
        &[
            "SIGTERM and SIGINT stop the server: it stops accepting, lets in-flight requests finish, sends subscribers a shutdown event, removes the socket file (unless inherited) and exits 0. Stopping needs neither the socket path nor a free descriptor. SIGHUP is logged and otherwise ignored.",
        ],
    )],
    see_also: "nkv-client(1), systemd.socket(5)",
};

/// Roff text: backslashes, hyphens and a leading control character escaped.
fn esc(text: &str) -> String {
    let text = text.replace('\\', "\\e").replace('-', "\\-");
    if text.starts_with('.') || text.starts_with('\'') {
        format!("\\&{text}")
    } else {
        text
    }
}

/// Writes the page for `cmd` onto `out`. A closed `out` (`| head`) is not an error.
pub fn render(cmd: clap::Command, page: &Page, out: &mut dyn Write) -> io::Result<()> {
    match write_page(cmd, page, out) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

fn write_page(mut cmd: clap::Command, page: &Page, out: &mut dyn Write) -> io::Result<()> {
    cmd.build();
    let man = clap_mangen::Man::new(cmd.clone());
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    man.render_options_section(out)?;
    let commands: Vec<&clap::Command> = cmd
        .get_subcommands()
        .filter(|c| !c.is_hide_set() && c.get_name() != "help")
        .collect();
    if !commands.is_empty() {
        writeln!(out, ".SH COMMANDS")?;
        for sub in commands {
            let mut usage = sub.clone().bin_name(sub.get_name().to_owned());
            let usage = usage.render_usage().to_string();
            let usage = usage.trim_start_matches("Usage:").trim();
            writeln!(out, ".TP\n\\fB{}\\fR", esc(usage))?;
            if let Some(about) = sub.get_about() {
                writeln!(out, "{}", esc(&about.to_string()))?;
            }
            let aliases: Vec<&str> = sub.get_visible_aliases().collect();
            if !aliases.is_empty() {
                writeln!(out, ".br\nAlias: {}", esc(&aliases.join(", ")))?;
            }
        }
    }
    writeln!(out, ".SH ENVIRONMENT")?;
    let mut seen = Vec::new();
    let args = cmd
        .get_arguments()
        .chain(cmd.get_subcommands().flat_map(|c| c.get_arguments()));
    for arg in args {
        let (Some(env), Some(long)) = (arg.get_env(), arg.get_long()) else {
            continue;
        };
        let env = env.to_string_lossy().into_owned();
        if seen.contains(&env) {
            continue;
        }
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        let boolish = if arg.get_num_args().is_some_and(|n| n.min_values() == 0) {
            " Accepts 1, 0, true, false, yes, no, on, off."
        } else {
            ""
        };
        writeln!(
            out,
            ".TP\n\\fB{}\\fR\nAs \\fB\\-\\-{}\\fR: {}.{boolish}",
            esc(&env),
            esc(long),
            esc(&help)
        )?;
        seen.push(env);
    }
    for (name, text) in page.environment {
        writeln!(out, ".TP\n\\fB{}\\fR\n{}", esc(name), esc(text))?;
    }
    writeln!(out, ".SH \"EXIT STATUS\"")?;
    for (code, text) in page.exit_status {
        writeln!(out, ".TP\n\\fB{code}\\fR\n{}", esc(text))?;
    }
    for (title, paragraphs) in page.sections {
        writeln!(out, ".SH {title}")?;
        for paragraph in *paragraphs {
            writeln!(out, ".PP\n{}", esc(paragraph))?;
        }
    }
    writeln!(out, ".SH \"SEE ALSO\"\n{}", esc(page.see_also))?;
    man.render_version_section(out)?;
    Ok(())
}
