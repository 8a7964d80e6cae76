//! The guest's network (issue 9): pen's own backend (pen-net behind `-netdev stream`)
//! keeps the host out of reach, applies `--network`/`--allow-host`, publishes ports, and
//! logs refusals to supervisor.log (`pen logs --network`).
//!
//! Guest side probes use bash's `/dev/tcp` (nothing to install) under `timeout 5`; the
//! guest HTTP server is `perl` (perl-base is in every Debian root, nothing else in the
//! base image can listen).
//!
//! Name resolution the test controls: `PEN_NET_HOSTS_FILE` (a test/debug hook read by the
//! supervisor) gives pen's DNS answers first. Those answers point at TEST-NET addresses
//! (198.51.100.0/24) that lead nowhere: every address that would reach a listener of this
//! test is the host's own (loopback or an interface address), which pen refuses unless
//! named with `--allow-host`. So "an allowed name connects" is shown two ways: the policy
//! lets the resolved TEST-NET address through (no refusal logged, unlike a literal IP), and,
//! when the host can resolve deb.debian.org (the apt tests need it anyway), a real HTTP
//! exchange with it in allow mode.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A host listener on every address (so loopback and the host's own addresses both reach
/// it) counting what it accepts; it answers each connection with one line.
struct HostListener {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

impl HostListener {
    fn new() -> HostListener {
        let l = TcpListener::bind("0.0.0.0:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        std::thread::spawn(move || {
            for mut s in l.incoming().flatten() {
                count.fetch_add(1, Ordering::SeqCst);
                let _ = s.write_all(b"hello-from-host\n");
            }
        });
        HostListener { port, accepted }
    }
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// The host's own non-loopback IPv4 addresses.
fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().unwrap() {
        if let Some(sin) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            let ip = IpAddr::V4(sin.ip());
            if !ip.is_loopback() && !out.contains(&ip) {
                out.push(ip);
            }
        }
    }
    out
}

/// A guest shell line: connect to HOST:PORT with bash, print what arrives, then
/// `TAG=<exit status>`.
fn probe(tag: &str, host: &str, port: u16) -> String {
    format!(
        "timeout 5 bash -c 'exec 3<>/dev/tcp/{host}/{port}; timeout 2 cat <&3'; echo {tag}=$?; "
    )
}

fn supervisor_log(pen: &Pen, vm: &str) -> String {
    std::fs::read_to_string(pen.vm_dir(vm).join("supervisor.log")).unwrap_or_default()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn the_host_is_unreachable_until_allowed_and_metadata_is_refused() {
    let pen = Pen::new("net-host");
    let host = HostListener::new();
    let port = host.port;
    let own = host_addresses();
    let hosts_file = pen.root.join("hosts");
    std::fs::write(&hosts_file, "198.51.100.7 probe.pen.test\n").unwrap();
    let mut script = String::new();
    script += &probe("gateway", "10.0.2.2", port);
    script += &probe("hostname", "host.pen.internal", port);
    script += &probe("dnsaddr", "10.0.2.3", port);
    for (i, ip) in own.iter().enumerate() {
        script += &probe(&format!("own{i}"), &ip.to_string(), port);
    }
    script += &probe("metadata", "169.254.169.254", 80);
    script += "getent hosts probe.pen.test; echo dns=$?";

    // Public mode, the default.
    let mut cmd = pen.cmd(&pen.create_args("start", "vm", &[]));
    cmd.env("PEN_NET_HOSTS_FILE", &hosts_file);
    run_cmd(cmd, None, TIMEOUT).ok();
    let out = pen.exec("vm", &["bash", "-c", &script]).ok();
    let text = out.stdout_str();
    for tag in ["gateway", "hostname", "dnsaddr", "metadata"] {
        assert!(
            !text.contains(&format!("{tag}=0")),
            "{tag} was reachable:\n{out}"
        );
        assert!(
            text.contains(&format!("{tag}=")),
            "{tag} was not probed:\n{out}"
        );
    }
    for (i, ip) in own.iter().enumerate() {
        assert!(
            !text.contains(&format!("own{i}=0")),
            "{ip} reachable:\n{out}"
        );
    }
    assert!(!text.contains("hello-from-host"), "{out}");
    assert_eq!(
        host.accepted(),
        0,
        "a host socket reached the test's listener"
    );
    // Public mode resolves through pen's DNS (here from the hook's answer).
    assert!(
        text.contains("198.51.100.7") && text.contains("dns=0"),
        "{out}"
    );

    let log = supervisor_log(&pen, "vm");
    assert!(
        log.contains(
            "supervisor: network: refused tcp 169.254.169.254:80: link-local or metadata address"
        ),
        "{log}"
    );
    assert!(
        log.contains(&format!("refused tcp 10.0.2.2:{port}")),
        "{log}"
    );
    for ip in &own {
        assert!(
            log.contains(&format!(
                "refused tcp {ip}:{port}: one of the host's own addresses"
            )),
            "{log}"
        );
    }
    // `pen logs --network` shows exactly the refusals.
    let logs = pen.run(&["logs", "--network", "vm"]).ok();
    let lines = logs.stdout_str();
    assert!(
        lines.contains("refused tcp 169.254.169.254:80: link-local or metadata address"),
        "{logs}"
    );
    assert!(lines.lines().all(|l| l.starts_with("refused ")), "{logs}");

    // Allowed at the next start (a snapshot restore, with a notice): reachable at the
    // gateway and at host.pen.internal; the host's other addresses stay refused.
    pen.run(&["stop", "vm"]).ok();
    let allow = format!("127.0.0.1:{port}");
    let out = pen
        .run(&pen.create_args("start", "vm", &["--allow-host", &allow]))
        .ok();
    assert!(
        out.stderr.contains("network is now public (allow-host"),
        "{out}"
    );
    let row = pen.row("vm").unwrap();
    assert_eq!(row["network"]["allow_hosts"][0], allow.as_str(), "{row}");
    let mut script =
        probe("gateway", "10.0.2.2", port) + &probe("hostname", "host.pen.internal", port);
    for (i, ip) in own.iter().enumerate() {
        script += &probe(&format!("own{i}"), &ip.to_string(), port);
    }
    let out = pen.exec("vm", &["bash", "-c", &script]).ok();
    let text = out.stdout_str();
    assert!(
        text.contains("gateway=0") && text.contains("hostname=0"),
        "{out}"
    );
    assert_eq!(text.matches("hello-from-host").count(), 2, "{out}");
    for (i, ip) in own.iter().enumerate() {
        assert!(
            !text.contains(&format!("own{i}=0")),
            "{ip} reachable:\n{out}"
        );
    }
    assert_eq!(host.accepted(), 2);
}

#[test]
fn network_none_fails_fast_and_allow_admits_only_allowed_names() {
    let pen = Pen::new("net-modes");
    pen.run(&pen.create_args("start", "vm", &["--network", "none"]))
        .ok();
    let out = pen
        .exec(
            "vm",
            &[
                "bash",
                "-c",
                "s=$(date +%s); apt-get update 2>&1; echo apt=$? took=$(( $(date +%s) - s ))",
            ],
        )
        .ok();
    let text = out.stdout_str();
    assert!(text.contains("Temporary failure resolving"), "{out}");
    let took: u64 = text
        .rsplit("took=")
        .next()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        took < 30,
        "apt-get update took {took}s with --network none:\n{out}"
    );
    assert!(
        supervisor_log(&pen, "vm").contains("refused dns deb.debian.org: network mode none"),
        "{}",
        supervisor_log(&pen, "vm")
    );
    assert_eq!(pen.row("vm").unwrap()["network"]["mode"], "none");

    // Allow mode: only allowed names resolve; a literal address is refused.
    pen.run(&["stop", "vm"]).ok();
    let hosts_file = pen.root.join("hosts");
    std::fs::write(
        &hosts_file,
        "198.51.100.7 allowed.pen.test\n198.51.100.8 denied.pen.test\n",
    )
    .unwrap();
    let real = ("deb.debian.org", 80).to_socket_addrs().is_ok();
    let mode = "allow=allowed.pen.test,deb.debian.org";
    let mut cmd = pen.cmd(&pen.create_args("start", "vm", &["--network", mode]));
    cmd.env("PEN_NET_HOSTS_FILE", &hosts_file);
    run_cmd(cmd, None, TIMEOUT).ok();
    let mut script = String::from(
        "getent hosts allowed.pen.test; echo allowed=$?; getent hosts denied.pen.test; echo denied=$?; ",
    );
    script += &probe("resolved", "allowed.pen.test", 80);
    script += &probe("literal", "198.51.100.9", 80);
    if real {
        script += "timeout 20 bash -c 'exec 3<>/dev/tcp/deb.debian.org/80; printf \"HEAD /debian/ HTTP/1.0\\r\\nHost: deb.debian.org\\r\\n\\r\\n\" >&3; head -1 <&3'; echo real=$?";
    }
    let out = pen.exec("vm", &["bash", "-c", &script]).ok();
    let text = out.stdout_str();
    assert!(
        text.contains("198.51.100.7") && text.contains("allowed=0"),
        "{out}"
    );
    assert!(
        !text.contains("denied=0") && !text.contains("198.51.100.8"),
        "{out}"
    );
    assert!(!text.contains("literal=0"), "{out}");
    let log = supervisor_log(&pen, "vm");
    assert!(
        log.contains("refused dns denied.pen.test: domain not in the allowed list"),
        "{log}"
    );
    assert!(
        log.contains("refused tcp 198.51.100.9:80: address not resolved from an allowed domain"),
        "{log}"
    );
    // The resolved address was let through by the policy (the connection itself leads
    // nowhere: TEST-NET).
    assert!(!log.contains("refused tcp 198.51.100.7"), "{log}");
    if real {
        assert!(text.contains("HTTP/1.") && text.contains("real=0"), "{out}");
    } else {
        eprintln!("net-modes: the host cannot resolve deb.debian.org; skipped the real connection");
    }
}

/// A one-connection-at-a-time HTTP server in the guest, left running in the background.
const GUEST_HTTP: &str = r#"perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(LocalPort => 8080, Listen => 5, ReuseAddr => 1) or die "listen: $!"; while ($c = $s->accept) { <$c>; print $c "HTTP/1.0 200 OK\r\n\r\nhello-from-guest\n"; close $c }' </dev/null >/dev/null 2>&1 &
sleep 1; echo started"#;

fn http_get(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(20)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })();
        match attempt {
            Ok(body) if body.contains("hello-from-guest") => return body,
            other if Instant::now() > deadline => panic!("no answer on {port}: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

#[test]
fn published_ports_work_after_a_restore_and_a_port_in_use_is_an_error() {
    let pen = Pen::new("net-publish");
    let port = free_port();
    let spec = format!("{port}:8080");
    pen.run(&pen.create_args("start", "web", &["--publish", &spec]))
        .ok();
    assert_eq!(
        pen.row("web").unwrap()["network"]["publish"][0],
        spec.as_str()
    );
    pen.exec("web", &["bash", "-c", GUEST_HTTP]).ok();
    assert!(http_get(port).contains("hello-from-guest"));

    // Stop, start again: restored from the image's snapshot (saved by the first start's
    // cold boot, or by another test), and the port is published again.
    pen.run(&["stop", "web"]).ok();
    pen.run(&pen.create_args("start", "web", &[])).ok();
    let log = supervisor_log(&pen, "web");
    assert!(log.contains("supervisor: restored snapshot"), "{log}");
    pen.exec("web", &["bash", "-c", GUEST_HTTP]).ok();
    assert!(http_get(port).contains("hello-from-guest"));

    // A host port already in use: a clear error naming it, before any QEMU starts.
    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port();
    let out = pen
        .run(&pen.create_args("start", "other", &["--publish", &format!("{busy_port}:80")]))
        .fails_with(Some(1), &[&format!("127.0.0.1:{busy_port}"), "in use"]);
    assert!(out.stderr.contains("cannot publish"), "{out}");
    assert!(pen.qemu_pids("other").is_empty());
    assert!(
        pen.row("other").is_none(),
        "nothing created for a port in use"
    );
    drop(busy);
}

/// A host server on 127.0.0.1 that reads `size` bytes from each connection, then sends
/// them back and closes it.
fn echo_server(size: usize) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut s in l.incoming().flatten() {
            let mut buf = vec![0u8; size];
            if s.read_exact(&mut buf).is_ok() {
                let _ = s.write_all(&buf);
            }
        }
    });
    port
}

/// The NIC is running at the first command, on a restore and on a cold boot alike (a link
/// that comes up a second later shows `state DOWN` and makes programs that check
/// `IFF_RUNNING` skip it), and the link carries 64 KiB frames (`pen_proto::LINK_MTU`): 8 MiB
/// of random bytes sent to a host server and echoed back arrive intact, in frames far
/// larger than Ethernet's 1500 bytes.
#[test]
fn the_nic_is_up_at_once_and_carries_large_frames_intact() {
    let pen = Pen::new("net-link");
    const SIZE: usize = 8 << 20;
    let port = echo_server(SIZE);
    let allow = format!("127.0.0.1:{port}");
    let script = format!(
        "cat /sys/class/net/eth0/operstate /sys/class/net/eth0/mtu
         head -c {SIZE} /dev/urandom > /tmp/data
         p0=$(cat /sys/class/net/eth0/statistics/tx_packets)
         b0=$(cat /sys/class/net/eth0/statistics/tx_bytes)
         exec 3<>/dev/tcp/10.0.2.2/{port}
         cat /tmp/data >&3
         cat <&3 > /tmp/back
         p1=$(cat /sys/class/net/eth0/statistics/tx_packets)
         b1=$(cat /sys/class/net/eth0/statistics/tx_bytes)
         cmp /tmp/data /tmp/back && echo intact
         echo bytes-per-frame=$(( (b1 - b0) / (p1 - p0) ))"
    );
    let check = |out: &Out| {
        let text = out.stdout_str();
        let mut lines = text.lines();
        assert_eq!(lines.next(), Some("up"), "{out}");
        assert_eq!(lines.next(), Some("65520"), "{out}");
        assert_eq!(lines.next(), Some("intact"), "{out}");
        let per_frame: usize = lines
            .next()
            .and_then(|l| l.strip_prefix("bytes-per-frame="))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no frame size:\n{out}"));
        assert!(per_frame > 16_000, "{per_frame} bytes per frame:\n{out}");
    };
    for extra in [&[][..], &["--no-snapshot"][..]] {
        let mut args = pen.create_args("exec", "vm", &["--allow-host", &allow]);
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["--", "bash", "-c", &script].map(String::from));
        check(&pen.run(&args).ok());
        pen.wait_status("vm", "stopped", Duration::from_secs(120));
    }
}

/// A LAN next to the host, made by the test without root, removed when dropped: a user,
/// network and mount namespace stands for the host (pen runs there: loopback, and one end
/// of a veth pair, 10.200.0.1/24), and a network namespace inside it for a machine on its
/// LAN (the other end, 10.200.0.2/24) serving one HTTP answer per connection on port 8080,
/// each connection counted in `lan.log`. The host's /etc/hosts there (a bind mount) also
/// gives `rebind.pen.test` the LAN address: a name whose answer, from the host's real
/// resolver, points into the LAN, as a DNS rebinding attack would make it.
///
/// pen-net opens the guest's connections from the supervisor's process, so the `pen`
/// commands that start a VM run in the namespace ([`Lan::cmd`]); the others only use unix
/// sockets and run anywhere.
struct Lan {
    holder: std::process::Child,
    server_pid: u32,
    log: std::path::PathBuf,
}

const LAN_HOST: &str = "10.200.0.2";
const LAN_PORT: u16 = 8080;
const REBIND_NAME: &str = "rebind.pen.test";

/// The LAN machine's server: answers each connection at once (a guest probe sends
/// nothing), appends a line to the log. Ends itself after an hour should the test die.
const LAN_SERVER: &str = r#"alarm 3600; use IO::Socket::INET; $s = IO::Socket::INET->new(LocalAddr => "10.200.0.2", LocalPort => 8080, Listen => 16, ReuseAddr => 1) or die "listen: $!"; while ($c = $s->accept) { open(L, ">>", $ARGV[0]); print L "accepted\n"; close L; print $c "HTTP/1.0 200 OK\r\n\r\nhello-from-lan\n"; close $c }"#;

fn ip_tool() -> String {
    for p in ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"] {
        if std::path::Path::new(p).exists() {
            return p.to_string();
        }
    }
    panic!("this test needs iproute2's `ip` (apt-get install iproute2)");
}

impl Lan {
    fn new(pen: &Pen) -> Lan {
        let ip = ip_tool();
        let log = pen.root.join("lan.log");
        let hosts = pen.root.join("hosts");
        let mut text = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        text += &format!("\n{LAN_HOST} {REBIND_NAME}\n");
        std::fs::write(&hosts, text).unwrap();
        let script = format!(
            r#"set -e
mount --bind "$HOSTS" /etc/hosts
{ip} link set lo up
unshare --net sh -c 'while ! {ip} link show lan0 >/dev/null 2>&1; do sleep 0.05; done
  {ip} link set lo up; {ip} addr add {LAN_HOST}/24 dev lan0; {ip} link set lan0 up
  exec perl -e "$SERVER" "$LOG"' &
lan=$!
while [ "$(readlink /proc/$lan/ns/net)" = "$(readlink /proc/self/ns/net)" ]; do sleep 0.05; done
{ip} link add pen0 type veth peer name lan0 netns $lan
{ip} addr add 10.200.0.1/24 dev pen0
{ip} link set pen0 up
echo "ready $lan"
wait"#
        );
        // An ordinary user (CI's): a user namespace of its own, mapping the user to itself
        // (pen must not think it is root) and keeping the capabilities to set up the links.
        // root: a network and mount namespace suffice, and pen stays root in them.
        let mut unshare = std::process::Command::new("unshare");
        if !nix::unistd::getuid().is_root() {
            let uid = nix::unistd::getuid().as_raw();
            let gid = nix::unistd::getgid().as_raw();
            unshare.args([
                "--user".to_string(),
                format!("--map-user={uid}"),
                format!("--map-group={gid}"),
                "--keep-caps".to_string(),
            ]);
        }
        let mut holder = unshare
            .args(["--net", "--mount", "--", "sh", "-c", &script])
            .env("HOSTS", &hosts)
            .env("SERVER", LAN_SERVER)
            .env("LOG", &log)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawning unshare (util-linux)");
        let mut line = String::new();
        let mut out = std::io::BufReader::new(holder.stdout.take().unwrap());
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        let server_pid = line
            .strip_prefix("ready ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| {
                let _ = holder.kill();
                panic!(
                    "could not make the test's LAN in a user and network namespace (needs \
                     unprivileged user namespaces, util-linux and iproute2): {line:?}; \
                     its stderr is above"
                )
            });
        let lan = Lan {
            holder,
            server_pid,
            log,
        };
        // The fixture itself: from pen's namespace the LAN host answers, and the name
        // resolves to it, so what pen refuses below is pen's doing.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let check = format!(
                "getent hosts {REBIND_NAME} && exec 3<>/dev/tcp/{REBIND_NAME}/{LAN_PORT} && timeout 5 cat <&3"
            );
            let cmd = lan.enter(
                std::path::Path::new("/"),
                &["bash".as_ref(), "-c".as_ref(), check.as_ref()],
            );
            let out = run_cmd(cmd, None, TIMEOUT);
            if out.stdout_str().contains("hello-from-lan") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the LAN host does not answer:\n{out}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        lan
    }

    /// `nsenter` into the namespace, to run `argv` there as this user, in `wd`.
    fn enter(&self, wd: &std::path::Path, argv: &[&std::ffi::OsStr]) -> std::process::Command {
        let mut cmd = std::process::Command::new("nsenter");
        if !nix::unistd::getuid().is_root() {
            cmd.args(["--user", "--preserve-credentials"]);
        }
        cmd.args(["--net", "--mount"])
            .arg(format!("--wd={}", wd.display()))
            .arg("-t")
            .arg(self.holder.id().to_string())
            .arg("--")
            .args(argv);
        cmd
    }

    /// `pen ARGS` as `pen.cmd` makes it, run in the namespace.
    fn cmd(&self, pen: &Pen, args: &[String]) -> std::process::Command {
        let plain = pen.cmd(args);
        let mut argv: Vec<&std::ffi::OsStr> = vec![std::ffi::OsStr::new(PEN)];
        argv.extend(plain.get_args());
        let mut cmd = self.enter(&pen.ws, &argv);
        for (k, v) in plain.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd
    }

    #[track_caller]
    fn run(&self, pen: &Pen, args: &[String]) -> Out {
        run_cmd(self.cmd(pen, args), None, TIMEOUT)
    }

    /// Connections the LAN host accepted so far.
    fn accepted(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .count()
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        kill9(self.server_pid);
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// Probes of the LAN host from the guest: by address on the served port and another one,
/// and by the name whose answer is the LAN address.
fn lan_probes() -> String {
    probe("byaddr", LAN_HOST, LAN_PORT)
        + &probe("otherport", LAN_HOST, LAN_PORT + 1)
        + &probe("byname", REBIND_NAME, LAN_PORT)
        + &format!("getent hosts {REBIND_NAME}; echo dns=$?")
}

/// Issue 23: the default network (`public`) reaches the internet but not the host's LAN:
/// a LAN host is refused by address and by a name answered with its address (DNS
/// rebinding), both logged; `--allow-host` opens that host's port, `--allow-net` its
/// range, `--network open` all of it; a VM that was `open` only as the old default becomes
/// `public` at its next start, saying how to keep `open`, and a chosen `open` stays.
#[test]
fn the_default_network_keeps_the_lan_out_and_each_opening_lets_it_in() {
    let pen = Pen::new("net-lan");
    let lan = Lan::new(&pen);
    let before = lan.accepted();
    let exec = |extra: &[&str]| {
        let out = lan.run(&pen, &pen.create_args("start", "vm", extra)).ok();
        let probed = pen.exec("vm", &["bash", "-c", &lan_probes()]).ok();
        (out, probed.stdout_str(), probed)
    };

    // The default: public. Nothing of the LAN is reached or resolved.
    let (_, text, out) = exec(&[]);
    for tag in ["byaddr", "otherport", "byname", "dns"] {
        assert!(
            text.contains(&format!("{tag}=")),
            "{tag} not probed:\n{out}"
        );
        assert!(
            !text.contains(&format!("{tag}=0")),
            "{tag} reached the LAN:\n{out}"
        );
    }
    assert!(
        !text.contains("hello-from-lan") && !text.contains(LAN_HOST),
        "{out}"
    );
    assert_eq!(lan.accepted(), before, "the LAN host was connected to");
    let row = pen.row("vm").unwrap();
    assert_eq!(row["network"]["mode"], "public", "{row}");
    assert_eq!(row["network"]["mode_chosen"], false, "{row}");
    let list = pen.run(&["list"]).ok().stdout_str();
    assert!(
        list.lines()
            .any(|l| l.starts_with("vm ") && l.contains(" public ")),
        "{list}"
    );
    let logs = pen.run(&["logs", "--network", "vm"]).ok().stdout_str();
    for line in [
        format!("refused tcp {LAN_HOST}:{LAN_PORT}: internal address (10.0.0.0/8) in network mode public"),
        format!("refused dns {REBIND_NAME}: answer {LAN_HOST} is an internal address (10.0.0.0/8) in network mode public"),
    ] {
        assert!(logs.contains(&line), "{line:?} not in pen logs --network:\n{logs}");
    }

    // --allow-host opens exactly that address and port; the name answers with it too.
    pen.run(&["stop", "vm"]).ok();
    let host = format!("{LAN_HOST}:{LAN_PORT}");
    let (_, text, out) = exec(&["--allow-host", &host]);
    assert!(
        text.contains("byaddr=0") && text.contains("byname=0"),
        "{out}"
    );
    assert!(!text.contains("otherport=0"), "{out}");
    assert_eq!(text.matches("hello-from-lan").count(), 2, "{out}");
    assert_eq!(lan.accepted(), before + 2);
    let logs = pen.run(&["logs", "--network", "vm"]).ok().stdout_str();
    assert!(
        logs.contains(&format!(
            "refused tcp {LAN_HOST}:{}: internal address",
            LAN_PORT + 1
        )),
        "{logs}"
    );

    // --allow-net opens the range: every port (the other one is closed on the LAN host,
    // not refused by pen) and the name.
    pen.run(&["stop", "vm"]).ok();
    let (started, text, out) = exec(&["--allow-host", "none", "--allow-net", "10.200.0.0/24"]);
    assert!(
        started
            .stderr
            .contains("network is now public (allow-net 10.200.0.0/24)"),
        "{started}"
    );
    assert!(
        text.contains("byaddr=0") && text.contains("byname=0"),
        "{out}"
    );
    assert_eq!(lan.accepted(), before + 4);
    let logs = std::fs::read_to_string(pen.vm_dir("vm").join("supervisor.log")).unwrap();
    assert!(!logs.contains("refused tcp 10.200"), "{logs}");
    assert!(!logs.contains("refused dns"), "{logs}");
    assert_eq!(
        pen.row("vm").unwrap()["network"]["allow_nets"][0],
        "10.200.0.0/24"
    );

    // --network open: all of the LAN, and it stays open at the next start.
    pen.run(&["stop", "vm"]).ok();
    let (_, text, out) = exec(&["--allow-net", "none", "--network", "open"]);
    assert!(
        text.contains("byaddr=0") && text.contains("byname=0"),
        "{out}"
    );
    assert_eq!(lan.accepted(), before + 6);
    pen.run(&["stop", "vm"]).ok();
    let again = lan.run(&pen, &pen.create_args("start", "vm", &[])).ok();
    assert!(!again.stderr.contains("network is now"), "{again}");
    let row = pen.row("vm").unwrap();
    assert_eq!(
        (&row["network"]["mode"], &row["network"]["mode_chosen"]),
        (&"open".into(), &true.into())
    );

    // A vm.json as pen wrote it before `public`: `open`, the default then, nothing saying
    // whether it was chosen. The next start makes it public and says how to keep open.
    pen.run(&["stop", "vm"]).ok();
    let path = pen.vm_dir("vm").join("vm.json");
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let network = json["network"].as_object_mut().unwrap();
    network.remove("mode_chosen");
    network.remove("allow_nets");
    std::fs::write(&path, serde_json::to_vec_pretty(&json).unwrap()).unwrap();
    assert_eq!(pen.row("vm").unwrap()["network"]["mode"], "open");
    let (started, text, out) = exec(&[]);
    let notices: Vec<&str> = started
        .stderr
        .lines()
        .filter(|l| l.contains("network is now"))
        .collect();
    assert_eq!(
        notices,
        ["pen: VM vm's network is now public (the internet, not the LAN: pen's new default) instead of open; to keep open, start it with --network open"],
        "{started}"
    );
    assert!(
        !text.contains("byaddr=0") && !text.contains("byname=0"),
        "{out}"
    );
    assert_eq!(lan.accepted(), before + 6);
    assert_eq!(pen.row("vm").unwrap()["network"]["mode"], "public");
}

/// A profile's builder VM gets `public` too when its profile says nothing: a build script
/// cannot reach the LAN of the machine it is built on, and the refusal is the hint.
#[test]
fn a_builder_vm_without_a_network_section_keeps_the_lan_out() {
    let pen = Pen::new("net-lan-build");
    let lan = Lan::new(&pen);
    let before = lan.accepted();
    let name = random_token("netlan-")[..15].to_string();
    let profiles = pen.home.join("profiles");
    std::fs::create_dir_all(&profiles).unwrap();
    std::fs::write(
        profiles.join(format!("{name}.toml")),
        format!("build = \"exec 3<>/dev/tcp/{LAN_HOST}/{LAN_PORT}; timeout 5 cat <&3\"\n"),
    )
    .unwrap();
    let images = pen.home.join("images/profiles").join(&name);
    let out = lan.run(&pen, &["image".into(), "build".into(), name.clone()]);
    let _ = std::fs::remove_dir_all(&images);
    assert_ne!(out.code, Some(0), "the build reached the LAN host:\n{out}");
    assert!(out.stderr.contains("step `build script` failed"), "{out}");
    assert!(
        out.stderr.contains(&format!(
            "refused tcp {LAN_HOST}:{LAN_PORT}: internal address (10.0.0.0/8) in network mode public"
        )),
        "the refusal is not in the hint:\n{out}"
    );
    assert_eq!(lan.accepted(), before, "the LAN host was connected to");
}

/// `--allow-net` takes one internal range: anything else is a usage error, one line,
/// exit 2, nothing created.
#[test]
fn bad_allow_net_values_are_usage_errors() {
    let pen = Pen::without_vms("net-badnet");
    for (value, words) in [
        (
            "0.0.0.0/0",
            &["--allow-net '0.0.0.0/0'", "every address", "--network open"][..],
        ),
        ("::/0", &["--allow-net '::/0'", "every address"][..]),
        (
            "10.0.0.0/7",
            &["'10.0.0.0/7'", "not inside one internal range"][..],
        ),
        ("8.8.8.0/24", &["public addresses need no --allow-net"][..]),
        ("10.200.0.2/24", &["host bits are set", "10.200.0.0/24"][..]),
        ("10.200.0.0", &["no prefix length"][..]),
        ("lan/24", &["'lan' is not an ip address"][..]),
    ] {
        pen.run(&pen.create_args("start", "x", &["--allow-net", value]))
            .usage_error(words);
    }
    pen.run(&pen.create_args("start", "x", &["--network", "lan"]))
        .usage_error(&["--network 'lan'", "public, open, none"]);
    assert!(pen.row("x").is_none(), "nothing is created for bad input");
}
