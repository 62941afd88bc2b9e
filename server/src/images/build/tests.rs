use super::*;

fn recipe(name: &'static str) -> Recipe {
    Recipe {
        name,
        script: format!("#!/bin/sh\n# {name}\n").into_bytes(),
        common: b"forkd_base_files() { :; }\n".to_vec(),
        host_input: if name == "minimal" { "busybox-static 1:1.35.0-4+b3".into() } else { String::new() },
    }
}

fn spec(base: BuildBase) -> BuildSpec {
    BuildSpec {
        base,
        apt: vec![],
        pip: vec![],
        run: vec![],
        mirror: DEFAULT_MIRROR.into(),
        step_timeout: DEFAULT_STEP_TIMEOUT,
    }
}

fn tree_spec() -> BuildSpec {
    spec(BuildBase::Tree { dir: "/nonexistent".into(), config: ImageConfig::default() })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn apt_package_names() {
    for ok in ["jq", "python3-pandas", "g++", "lib32z1", "libc6=2.36-9+deb12u4", "apt=2.6.1", "x1=1:2.0~rc1"] {
        assert!(check_apt_package(ok).is_ok(), "{ok}");
    }
    for bad in [
        "",
        "j",
        "-o",
        "--force-yes",
        "Jq",
        "jq;rm",
        "jq bar",
        "jq=",
        "jq=abc",
        "jq=1 2",
        "a,b",
        "?essential",
        "jq/bookworm",
        "jq:amd64",
        ".jq",
        "jq\n",
    ] {
        assert!(check_apt_package(bad).is_err(), "{bad:?}");
    }
    assert!(check_apt_package(&"a".repeat(MAX_PACKAGE_LEN + 1)).is_err());
}

#[test]
fn pip_requirements() {
    for ok in [
        "requests",
        "requests==2.31.0",
        "numpy>=1.24,<2",
        "Django~=4.2",
        "zope.interface",
        "requests[socks,security]>=2",
        "foo_bar-baz",
        "pkg!=1.0.*",
        "pkg===1.0",
        "torch==2.1.0+cpu",
        "a",
    ] {
        assert!(check_pip_requirement(ok).is_ok(), "{ok}: {:?}", check_pip_requirement(ok));
    }
    for bad in [
        "",
        "-e",
        "-r/etc/passwd",
        "--index-url=http://x",
        "git+https://x",
        "pkg@file:///etc",
        "pkg @ file:///etc",
        "pkg;os_name=='nt'",
        "pkg >=1",
        "a b",
        "pkg$(id)",
        "./local",
        "/abs",
        "pkg[",
        "pkg[x",
        "pkg[]",
        "pkg==",
        ".pkg",
        "pkg-",
        "pkg=1",
        "pkg>=1,",
        "pkg`id`",
        "pkg\n",
    ] {
        assert!(check_pip_requirement(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn run_commands() {
    assert!(check_run_command("echo hi && apt-get clean").is_ok());
    assert!(check_run_command("for i in 1 2; do\n  echo $i\ndone").is_ok());
    assert!(check_run_command("").is_err());
    assert!(check_run_command("  \n").is_err());
    assert!(check_run_command("echo \0").is_err());
    assert!(check_run_command(&"x".repeat(MAX_RUN_LEN)).is_ok());
    assert!(check_run_command(&"x".repeat(MAX_RUN_LEN + 1)).is_err());
}

#[test]
fn validation_names_the_offending_item() {
    let mut s = spec(BuildBase::Recipe(recipe("python")));
    s.apt = vec!["jq".into(), "bad;rm -rf /".into()];
    match s.validate() {
        Err(ImageError::Invalid(m)) => assert!(m.contains("bad;rm -rf /") && m.contains("apt"), "{m}"),
        other => panic!("{other:?}"),
    }
    let mut s = spec(BuildBase::Recipe(recipe("python")));
    s.pip = vec!["numpy".into(), "--index-url=http://evil".into()];
    match s.validate() {
        Err(ImageError::Invalid(m)) => assert!(m.contains("--index-url=http://evil") && m.contains("pip"), "{m}"),
        other => panic!("{other:?}"),
    }
    let mut s = spec(BuildBase::Recipe(recipe("python")));
    s.run = vec!["true".into(), String::new()];
    match s.validate() {
        Err(ImageError::Invalid(m)) => assert!(m.contains("run command 2"), "{m}"),
        other => panic!("{other:?}"),
    }
    let mut s = spec(BuildBase::Recipe(recipe("python")));
    s.apt = vec!["jq".into(); MAX_APT_PACKAGES + 1];
    assert!(matches!(s.validate(), Err(ImageError::Invalid(_))));
    let mut s = spec(BuildBase::Recipe(recipe("python")));
    s.run = vec!["true".into(); MAX_RUN_COMMANDS + 1];
    assert!(matches!(s.validate(), Err(ImageError::Invalid(_))));
    let mut s = spec(BuildBase::Recipe(recipe("python")));
    s.mirror = "http://deb.debian.org/debian bookworm main\ndeb http://evil".into();
    assert!(matches!(s.validate(), Err(ImageError::Invalid(_))));
    s.mirror = "ftp://x".into();
    assert!(matches!(s.validate(), Err(ImageError::Invalid(_))));
    let mut s = spec(BuildBase::Recipe(recipe("python")));
    s.step_timeout = Duration::ZERO;
    assert!(matches!(s.validate(), Err(ImageError::Invalid(_))));
    let mut s = spec(BuildBase::Recipe(recipe("python")));
    s.apt = vec!["jq".into(), "python3-pandas=1.5.3+dfsg-2".into()];
    s.pip = vec!["requests[socks]>=2,<3".into()];
    s.run = vec!["echo hi".into()];
    s.validate().unwrap();
}

#[test]
fn minimal_takes_no_pip_packages() {
    let mut s = spec(BuildBase::Recipe(recipe("minimal")));
    s.pip = vec!["requests".into()];
    match s.validate() {
        Err(ImageError::Invalid(m)) => assert!(m.contains("no python3") && m.contains("requests"), "{m}"),
        other => panic!("{other:?}"),
    }
    s.pip.clear();
    s.apt = vec!["jq".into()];
    s.validate().unwrap();
}

#[test]
fn build_validates_before_running_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    std::fs::create_dir(&root).unwrap();
    let mut s = spec(BuildBase::Recipe(recipe("python")));
    s.pip = vec!["-e .".into()];
    let mut lines = vec![];
    let e = build(&s, &root, &tmp.path().join("cache"), &mut |l| lines.push(l.to_string())).unwrap_err();
    assert!(matches!(e, ImageError::Invalid(_)), "{e}");
    assert!(lines.is_empty());
    assert!(!tmp.path().join("cache").exists(), "nothing may be created for an invalid spec");
}

#[test]
fn build_wants_an_empty_staging_dir() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("x"), "").unwrap();
    let s = spec(BuildBase::Recipe(recipe("minimal")));
    let e = build(&s, tmp.path(), &tmp.path().join("cache"), &mut |_| {}).unwrap_err();
    assert!(matches!(e, ImageError::Invalid(ref m) if m.contains("not empty")), "{e}");
}

#[test]
fn digest_is_stable() {
    let mut s = spec(BuildBase::Recipe(recipe("python")));
    s.apt = vec!["python3-pandas".into()];
    s.pip = vec!["requests".into()];
    s.run = vec!["echo hi".into()];
    let d = input_digest(&s, "");
    assert_eq!(d, input_digest(&s.clone(), ""));
    assert!(super::super::store::is_digest(&d), "{d}");
    // Pinned: a change of the encoding must come with a new BUILD_VERSION.
    assert_eq!(d, "sha256:688714835c12f5b1d963c305b3a7d44b013da70430811825637a5885b935f75b");
    let mut t = tree_spec();
    t.apt = vec!["jq".into()];
    assert_eq!(
        input_digest(&t, "sha256:0123"),
        "sha256:4b7cfc76ffc5f7d1d5abafa8bd9ecd4ca77c23f6ddc162cffaa7f5ec1dd3364d"
    );
}

#[test]
fn digest_is_order_sensitive() {
    let base = || spec(BuildBase::Recipe(recipe("python")));
    let with = |apt: &[&str], pip: &[&str], run: &[&str]| {
        let mut s = base();
        s.apt = apt.iter().map(|x| x.to_string()).collect();
        s.pip = pip.iter().map(|x| x.to_string()).collect();
        s.run = run.iter().map(|x| x.to_string()).collect();
        input_digest(&s, "")
    };
    let all = [
        with(&["a1", "b1"], &[], &[]),
        with(&["b1", "a1"], &[], &[]),
        with(&["a1b1"], &[], &[]),
        with(&[], &["a1", "b1"], &[]),
        with(&[], &["b1", "a1"], &[]),
        with(&[], &[], &["a1", "b1"]),
        with(&[], &[], &["b1", "a1"]),
        with(&[], &[], &["a1 b1"]),
        with(&["a1"], &["b1"], &[]),
        with(&["b1"], &["a1"], &[]),
        with(&[], &[], &[]),
    ];
    let set: std::collections::HashSet<_> = all.iter().collect();
    assert_eq!(set.len(), all.len(), "{all:#?}");
}

#[test]
fn digest_changes_with_each_input() {
    let mut s = spec(BuildBase::Recipe(recipe("minimal")));
    s.apt = vec!["jq".into()];
    let d0 = input_digest(&s, "");
    let changed = |f: &dyn Fn(&mut BuildSpec)| {
        let mut t = s.clone();
        f(&mut t);
        input_digest(&t, "")
    };
    let variants = [
        changed(&|t| t.apt.push("curl".into())),
        changed(&|t| t.apt[0] = "jq=1.6-2.1".into()),
        changed(&|t| t.run.push("true".into())),
        changed(&|t| t.mirror = "http://ftp.de.debian.org/debian".into()),
        changed(&|t| {
            if let BuildBase::Recipe(r) = &mut t.base {
                r.script.push(b'\n')
            }
        }),
        changed(&|t| {
            if let BuildBase::Recipe(r) = &mut t.base {
                r.common.push(b'\n')
            }
        }),
        changed(&|t| {
            if let BuildBase::Recipe(r) = &mut t.base {
                r.host_input = "busybox-static 1:1.36.1-9".into()
            }
        }),
        changed(&|t| t.base = BuildBase::Recipe(recipe("python"))),
        digest_with_version("forkd-image-build/2", &s, ""),
    ];
    for (i, d) in variants.iter().enumerate() {
        assert_ne!(*d, d0, "variant {i}");
    }
    let set: std::collections::HashSet<_> = variants.iter().collect();
    assert_eq!(set.len(), variants.len());
    // pip changes it too (on a base that may have pip packages).
    let mut p = spec(BuildBase::Recipe(recipe("python")));
    let before = input_digest(&p, "");
    p.pip.push("requests".into());
    assert_ne!(input_digest(&p, ""), before);
    // A tree base is its image digest.
    let t = tree_spec();
    assert_ne!(input_digest(&t, "sha256:aa"), input_digest(&t, "sha256:ab"));
    assert_ne!(input_digest(&t, ""), input_digest(&spec(BuildBase::Recipe(recipe("python"))), ""));
}

#[test]
fn digest_ignores_what_does_not_change_the_result() {
    let s = spec(BuildBase::Recipe(recipe("python")));
    // A recipe base is its recipe: base_digest plays no part.
    assert_eq!(input_digest(&s, ""), input_digest(&s, "sha256:whatever"));
    let mut t = s.clone();
    t.step_timeout = Duration::from_secs(1);
    assert_eq!(input_digest(&s, ""), input_digest(&t, ""));
    // A tree base's path and config are covered by its digest.
    let a = tree_spec();
    let b = spec(BuildBase::Tree {
        dir: "/elsewhere".into(),
        config: ImageConfig { env: vec!["A=b".into()], ..Default::default() },
    });
    assert_eq!(input_digest(&a, "sha256:aa"), input_digest(&b, "sha256:aa"));
}

#[test]
fn recipes_load_from_a_directory() {
    let tmp = tempfile::tempdir().unwrap();
    match Recipe::load(tmp.path(), "python") {
        Err(ImageError::Precondition(m)) => assert!(m.contains("python.sh") && m.contains(RECIPES_SUBDIR), "{m}"),
        other => panic!("{other:?}"),
    }
    std::fs::write(tmp.path().join("python.sh"), "echo python\n").unwrap();
    match Recipe::load(tmp.path(), "python") {
        Err(ImageError::Precondition(m)) => assert!(m.contains("common.sh"), "{m}"),
        other => panic!("{other:?}"),
    }
    std::fs::write(tmp.path().join("common.sh"), "echo common\n").unwrap();
    let r = Recipe::load(tmp.path(), "python").unwrap();
    assert_eq!(r.name(), "python");
    assert_eq!(r.script, b"echo python\n");
    assert_eq!(r.common, b"echo common\n");
    assert!(matches!(Recipe::load(tmp.path(), "../python"), Err(ImageError::Invalid(_))));
    assert!(matches!(Recipe::load(tmp.path(), "debian"), Err(ImageError::Invalid(_))));
    // The digest follows the file contents.
    let d1 = input_digest(&spec(BuildBase::Recipe(r)), "");
    std::fs::write(tmp.path().join("common.sh"), "echo common 2\n").unwrap();
    let d2 = input_digest(&spec(BuildBase::Recipe(Recipe::load(tmp.path(), "python").unwrap())), "");
    assert_ne!(d1, d2);
}

#[test]
fn the_repository_recipes_load() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/images");
    for name in RECIPES {
        let r = Recipe::load(&dir, name).unwrap();
        let text = String::from_utf8(r.script.clone()).unwrap();
        assert!(text.contains("FORKD_EXTRA_PACKAGES") && text.contains("FORKD_APT_CACHE"), "{name}");
    }
}

#[test]
fn probe_output_parses() {
    let lines: Vec<String> = ["python3=1", "managed=1", "dpkg=1", "os=debian", "codename=bookworm", "noise", "pip=0"]
        .map(String::from)
        .into();
    let p = Probe::parse(&lines);
    assert_eq!(
        p,
        Probe {
            python3: true,
            pip: false,
            managed: true,
            dpkg: true,
            os_id: "debian".into(),
            codename: "bookworm".into()
        }
    );
    assert_eq!(Probe::parse(&[]), Probe::default());
}

#[test]
fn the_jail_env_keeps_the_image_env() {
    let config = ImageConfig {
        env: vec![
            "PATH=/opt/py/bin:/usr/bin".into(),
            "LANG=de_DE.UTF-8".into(),
            "X=1".into(),
            "X=2".into(),
            "=bad".into(),
        ],
        ..Default::default()
    };
    let env = jail_env(&config);
    let get = |k: &str| env.iter().find(|(ek, _)| ek == k).map(|(_, v)| v.as_str());
    assert_eq!(get("PATH"), Some("/opt/py/bin:/usr/bin"));
    assert_eq!(get("LANG"), Some("de_DE.UTF-8"));
    assert_eq!(get("X"), Some("2"));
    assert_eq!(env.iter().filter(|(k, _)| k == "X").count(), 1);
    assert_eq!(get("HOME"), Some("/root"));
    assert!(env.iter().all(|(k, _)| !k.is_empty()));
    assert_eq!(get("PATH").map(|_| ()), Some(()));
    let env = jail_env(&ImageConfig::default());
    assert!(env.contains(&("PATH".into(), DEFAULT_PATH.into())));
}

#[test]
fn output_is_split_into_bounded_lines() {
    let (tx, rx) = mpsc::channel();
    let mut input = b"one\ntwo\r\n\nthree\rfour\n".to_vec();
    input.extend(std::iter::repeat_n(b'x', MAX_LINE + 10));
    read_lines(&input[..], &tx);
    drop(tx);
    let got: Vec<String> = rx.iter().collect();
    assert_eq!(&got[..4], &["one", "two", "three", "four"]);
    assert_eq!(got[4].len(), MAX_LINE);
    assert_eq!(got[5].len(), 10);
    assert_eq!(got.len(), 6);
}

#[test]
fn the_cache_is_pruned_least_recently_used_first() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, name) in ["old.deb", "mid.deb", "new.deb"].into_iter().enumerate() {
        let p = tmp.path().join(name);
        std::fs::write(&p, vec![0u8; 1000]).unwrap();
        let t = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + i as u64 * 1000);
        let f = File::options().write(true).open(&p).unwrap();
        f.set_times(std::fs::FileTimes::new().set_accessed(t).set_modified(t)).unwrap();
    }
    std::fs::create_dir(tmp.path().join("partial")).unwrap();
    assert_eq!(prune_dir(tmp.path(), 3000), 0);
    assert_eq!(prune_dir(tmp.path(), 2500), 2);
    assert!(tmp.path().join("new.deb").exists());
    assert!(!tmp.path().join("old.deb").exists() && !tmp.path().join("mid.deb").exists());
    assert!(tmp.path().join("partial").is_dir());
}

#[test]
fn numbers_format_without_allocating() {
    let mut b = [0u8; 20];
    assert_eq!(fmt_u64(0, &mut b), b"0");
    assert_eq!(fmt_u64(4294967295, &mut b), b"4294967295");
    assert_eq!(fmt_u64(u64::MAX, &mut b), b"18446744073709551615");
}

#[test]
fn resolv_conf_is_put_back() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    std::fs::create_dir(root.join("etc")).unwrap();
    let mut log = |_: &str| {};
    // Missing: created for the build, removed after.
    let g = ResolvGuard::prepare(root, &mut log).unwrap();
    assert!(g.usable(root));
    assert!(root.join("etc/resolv.conf").is_file());
    drop(g);
    assert!(std::fs::symlink_metadata(root.join("etc/resolv.conf")).is_err());
    // A symlink: moved aside, moved back.
    std::os::unix::fs::symlink("../run/systemd/resolve/stub-resolv.conf", root.join("etc/resolv.conf")).unwrap();
    let g = ResolvGuard::prepare(root, &mut log).unwrap();
    assert!(std::fs::symlink_metadata(root.join("etc/resolv.conf")).unwrap().is_file());
    drop(g);
    assert_eq!(
        std::fs::read_link(root.join("etc/resolv.conf")).unwrap(),
        Path::new("../run/systemd/resolve/stub-resolv.conf")
    );
    assert!(std::fs::symlink_metadata(root.join("etc").join(RESOLV_ASIDE)).is_err());
    // A file: left alone.
    std::fs::remove_file(root.join("etc/resolv.conf")).unwrap();
    std::fs::write(root.join("etc/resolv.conf"), "nameserver 10.0.0.1\n").unwrap();
    drop(ResolvGuard::prepare(root, &mut log).unwrap());
    assert_eq!(std::fs::read_to_string(root.join("etc/resolv.conf")).unwrap(), "nameserver 10.0.0.1\n");
    // /etc a symlink (to the host's /etc, say): nothing is touched.
    let evil = tempfile::tempdir().unwrap();
    std::fs::remove_dir_all(root.join("etc")).unwrap();
    std::os::unix::fs::symlink(evil.path(), root.join("etc")).unwrap();
    let g = ResolvGuard::prepare(root, &mut log).unwrap();
    assert!(!g.usable(root));
    drop(g);
    assert_eq!(std::fs::read_dir(evil.path()).unwrap().count(), 0);
}

#[test]
fn jail_mount_points_must_be_plain_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    ensure_plain_dir(root, "dev").unwrap();
    assert!(root.join("dev").is_dir());
    std::os::unix::fs::symlink("/", root.join("proc")).unwrap();
    assert!(matches!(ensure_plain_dir(root, "proc"), Err(ImageError::Invalid(_))));
    std::os::unix::fs::symlink("/tmp", root.join("var")).unwrap();
    assert!(matches!(ensure_plain_dir(root, "var/cache/apt/archives"), Err(ImageError::Invalid(_))));
}

// ---- steps in namespaces (root only) -----------------------------------------

fn step(argv: &[&str], mode: Mode) -> Step {
    Step {
        title: "test".into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: host_env(),
        mode,
        blame: Blame::Host,
        capture: true,
    }
}

/// A tree with the host's static busybox as /bin/sh, nothing else.
fn busybox_tree() -> Option<tempfile::TempDir> {
    let bb = Path::new("/bin/busybox");
    let static_bb = Command::new("ldd").arg(bb).output().map(|o| !o.status.success()).unwrap_or(false);
    if !bb.is_file() || !static_bb {
        panic!("cannot run: no static /bin/busybox (busybox-static)");
    }
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir(t.path().join("bin")).unwrap();
    std::fs::copy(bb, t.path().join("bin/busybox")).unwrap();
    for l in ["sh", "cat", "grep", "ls", "echo", "mount", "wc", "sleep", "id", "hostname", "ip", "touch", "tr", "sed"] {
        std::os::unix::fs::symlink("busybox", t.path().join("bin").join(l)).unwrap();
    }
    ensure_plain_dir(t.path(), "dev").unwrap();
    ensure_plain_dir(t.path(), "proc").unwrap();
    Some(t)
}

fn no_process_mentions(needle: &str) -> bool {
    let mine = std::process::id().to_string();
    std::fs::read_dir("/proc").unwrap().flatten().all(|e| {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == mine || !name.bytes().all(|b| b.is_ascii_digit()) {
            return true;
        }
        let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        !String::from_utf8_lossy(&cmd).contains(needle)
    })
}

#[test]
fn a_host_step_runs_in_its_own_namespaces() {
    if !is_root() {
        panic!("cannot run: needs root");
    }
    let s = step(&["/bin/sh", "-c", "echo pid=$$; id -u; cat /proc/self/uid_map; hostname; echo err >&2"], Mode::Host);
    let mut seen = vec![];
    let out = run_process(&s, Path::new("/"), Duration::from_secs(30), &mut |l| seen.push(l.to_string())).unwrap();
    assert_eq!(out.code, 0, "{:?}", out.tail);
    let text = out.lines.join("\n");
    assert!(text.contains("pid=1"), "{text}");
    assert!(out.lines.iter().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["0", "0", "4294967295"]), "{text}");
    assert!(out.lines.contains(&"forkd".to_string()), "{text}");
    assert!(out.lines.contains(&"err".to_string()), "{text}");
    assert_eq!(seen, out.lines);
}

#[test]
fn a_timeout_kills_the_whole_step() {
    if !is_root() {
        panic!("cannot run: needs root");
    }
    let started = Instant::now();
    let s = step(&["/bin/sh", "-c", "sleep 1000.4711 & sleep 1000.4711; echo never"], Mode::Host);
    let out = run_process(&s, Path::new("/"), Duration::from_secs(1), &mut |_| {}).unwrap();
    assert!(out.timed_out);
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    std::thread::sleep(Duration::from_millis(200));
    assert!(no_process_mentions("1000.4711"), "a process of the step survived");
    // A plain step too (process group).
    let s = step(&["/bin/sh", "-c", "sleep 1000.4712 & sleep 1000.4712"], Mode::Plain);
    let out = run_process(&s, Path::new("/"), Duration::from_secs(1), &mut |_| {}).unwrap();
    assert!(out.timed_out);
    std::thread::sleep(Duration::from_millis(200));
    assert!(no_process_mentions("1000.4712"));
}

#[test]
fn exit_codes_and_signals_come_through() {
    if !is_root() {
        panic!("cannot run: needs root");
    }
    let out = run_process(
        &step(&["/bin/sh", "-c", "exit 7"], Mode::Host),
        Path::new("/"),
        Duration::from_secs(30),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(out.code, 7);
    let out = run_process(
        &step(&["/bin/sh", "-c", "kill -9 $$"], Mode::Plain),
        Path::new("/"),
        Duration::from_secs(30),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(out.code, 128 + 9);
}

#[test]
fn the_jail_confines_a_step() {
    if !is_root() {
        panic!("cannot run: needs root");
    }
    let Some(tree) = busybox_tree() else { return };
    let root = tree.path().canonicalize().unwrap();
    let host_dir = tempfile::tempdir().unwrap();
    std::fs::write(host_dir.path().join("secret"), "host file\n").unwrap();
    let script = r#"
        echo "pid=$$"
        ls / | tr '\n' ' ' ; echo
        echo x > /dev/null && echo devnull-ok
        [ -c /dev/urandom ] && echo urandom-ok
        echo "procs=$(ls /proc | grep -c '^[0-9]')"
        echo 1 > /proc/sys/kernel/panic 2>/dev/null || echo procsys-ro
        echo h > /proc/sysrq-trigger 2>/dev/null || echo sysrq-ro
        mount -t tmpfs x /tmp 2>/dev/null || echo mount-denied
        grep -E '^(CapBnd|NoNewPrivs)' /proc/self/status
        cat /data/secret
        cat /dev/one-file | sed 's/^/file: /'
        touch /data/new 2>/dev/null || echo bind-ro
        ip link 2>/dev/null | grep -c '^[0-9]' | sed 's/^/links=/'
        echo "cwd=$(pwd)"
    "#;
    let s = Step {
        title: "jail".into(),
        argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
        env: jail_env(&ImageConfig::default()),
        mode: Mode::Jail(JailSpec {
            network: false,
            binds: vec![
                BindSpec {
                    src: host_dir.path().into(),
                    dst: "/dev/data".into(),
                    read_only: true,
                    make: MountPoint::Dir,
                },
                BindSpec {
                    src: host_dir.path().join("secret"),
                    dst: "/dev/one-file".into(),
                    read_only: true,
                    make: MountPoint::File,
                },
            ],
            cwd: "/bin".into(),
        }),
        blame: Blame::Host,
        capture: true,
    };
    // /data is a link into the step's /dev, where the bind lands.
    std::os::unix::fs::symlink("dev/data", root.join("data")).unwrap();
    let out = run_process(&s, &root, Duration::from_secs(30), &mut |_| {}).unwrap();
    let text = out.lines.join("\n");
    assert_eq!(out.code, 0, "{text}");
    assert!(text.contains("pid=1"), "{text}");
    let listing = out.lines[1].split_whitespace().collect::<Vec<_>>();
    assert_eq!(listing, ["bin", "data", "dev", "proc"], "{text}");
    for want in [
        "devnull-ok",
        "urandom-ok",
        "procsys-ro",
        "sysrq-ro",
        "mount-denied",
        "host file",
        "file: host file",
        "bind-ro",
        "cwd=/bin",
    ] {
        assert!(out.lines.iter().any(|l| l == want), "{want} missing in:\n{text}");
    }
    let procs: u32 = out.lines.iter().find_map(|l| l.strip_prefix("procs=")).unwrap().parse().unwrap();
    assert!(procs <= 4, "{text}");
    let bnd = out.lines.iter().find_map(|l| l.strip_prefix("CapBnd:")).unwrap().trim();
    let want: u64 = JAIL_KEEP_CAPS.iter().map(|c| 1u64 << c).sum();
    assert_eq!(u64::from_str_radix(bnd, 16).unwrap(), want, "{text}");
    assert!(text.contains("NoNewPrivs:\t1"), "{text}");
    assert!(out.lines.iter().any(|l| l == "links=1"), "only lo without network: {text}");
    // Nothing of the jail is left: no mounts, an empty /dev.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(root.to_str().unwrap()), "{mounts}");
    assert_eq!(std::fs::read_dir(root.join("dev")).unwrap().count(), 0);
    assert!(!host_dir.path().join("new").exists());
}

#[test]
fn a_jail_without_a_shell_is_reported() {
    if !is_root() {
        panic!("cannot run: needs root");
    }
    let tree = tempfile::tempdir().unwrap();
    ensure_plain_dir(tree.path(), "dev").unwrap();
    ensure_plain_dir(tree.path(), "proc").unwrap();
    let s = step(&["/bin/sh", "-c", "true"], Mode::Jail(JailSpec { network: false, binds: vec![], cwd: "/".into() }));
    let e = run_process(&s, tree.path(), Duration::from_secs(30), &mut |_| {}).err().expect("no /bin/sh");
    assert!(matches!(e, ImageError::Precondition(ref m) if m.contains("in the image")), "{e}");
}

#[test]
fn a_tree_base_without_dpkg_or_python() {
    if !is_root() {
        panic!("cannot run: needs root");
    }
    let Some(tree) = busybox_tree() else { return };
    let cache = tempfile::tempdir().unwrap();
    let base = || BuildBase::Tree { dir: tree.path().into(), config: ImageConfig::default() };
    let attempt = |s: &BuildSpec| {
        let stage = tempfile::tempdir().unwrap();
        let r = build(s, stage.path(), cache.path(), &mut |l| eprintln!("{l}"));
        (stage, r)
    };
    let mut s = spec(base());
    s.apt = vec!["jq".into()];
    match attempt(&s).1 {
        Err(ImageError::Precondition(m)) => assert!(m.contains("no dpkg"), "{m}"),
        other => panic!("{other:?}"),
    }
    let mut s = spec(base());
    s.pip = vec!["requests".into()];
    match attempt(&s).1 {
        Err(ImageError::Precondition(m)) => assert!(m.contains("no python3"), "{m}"),
        other => panic!("{other:?}"),
    }
    let mut s = spec(base());
    s.run = vec!["echo hi > /made-by-run; pwd > /cwd".into()];
    let (stage, r) = attempt(&s);
    let config = r.unwrap();
    assert_eq!(config.working_dir, "/root");
    assert_eq!(std::fs::read_to_string(stage.path().join("made-by-run")).unwrap(), "hi\n");
    // The image has no /root: the command ran in /.
    assert_eq!(std::fs::read_to_string(stage.path().join("cwd")).unwrap(), "/\n");
    assert!(!stage.path().join("etc").exists(), "no /etc is made for DNS");
    assert!(!tree.path().join("made-by-run").exists(), "the base is never changed");
    // The scratch space is gone.
    assert_eq!(std::fs::read_dir(cache.path().join("tmp")).unwrap().count(), 0);
}

// ---- real builds: Debian archive and PyPI (root, mmdebstrap) ----------------

/// The shared cache of real builds: `$FORKD_CACHE_DIR/build`, so repeated
/// runs reuse the downloaded packages.
fn real_build_env() -> Option<PathBuf> {
    if !is_root() {
        panic!("cannot run: real builds need root");
    }
    if find_tool("mmdebstrap").is_err() {
        panic!("cannot run: mmdebstrap is not installed (scripts/setup-host.sh)");
    }
    use std::net::ToSocketAddrs;
    let reachable = ("deb.debian.org", 80)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_secs(10)).is_ok());
    if !reachable {
        panic!("cannot run: deb.debian.org is unreachable");
    }
    let cache =
        PathBuf::from(std::env::var("FORKD_CACHE_DIR").unwrap_or_else(|_| "/var/cache/forkd".into())).join("build");
    std::fs::create_dir_all(&cache).unwrap();
    Some(cache)
}

fn repo_recipe(name: &str) -> Recipe {
    Recipe::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest/images"), name).unwrap()
}

fn timed_build(spec: &BuildSpec, cache: &Path, what: &str) -> (tempfile::TempDir, ImageConfig, Duration) {
    let stage = tempfile::Builder::new().prefix("test-stage-").tempdir_in(cache).unwrap();
    let started = Instant::now();
    let mut log = vec![];
    let r = build(spec, stage.path(), cache, &mut |l| {
        eprintln!("[{what}] {l}");
        log.push(l.to_string())
    });
    let took = started.elapsed();
    let config = r.unwrap_or_else(|e| panic!("{what}: {e}"));
    eprintln!("[{what}] built in {:.1}s", took.as_secs_f64());
    (stage, config, took)
}

/// `chroot ROOT ARGV…` succeeds; where this process may not chroot (e.g.
/// under the daemon's capability set) the build's own jail runs it.
fn chroot_ok(root: &Path, argv: &[&str]) -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim();
    if u64::from_str_radix(eff, 16).unwrap() & (1 << 18) /* CAP_SYS_CHROOT */ != 0 {
        return Command::new("chroot").arg(root).args(argv).status().is_ok_and(|s| s.success());
    }
    let mut s = step(argv, Mode::Jail(JailSpec { network: false, binds: vec![], cwd: "/".into() }));
    s.env = jail_env(&ImageConfig::default());
    run_process(&s, root, Duration::from_secs(120), &mut |l| eprintln!("{l}")).is_ok_and(|o| o.code == 0)
}

/// What a built tree must not carry: downloaded packages, package lists,
/// device nodes, mounts.
fn assert_clean_image(root: &Path) {
    let debs = std::fs::read_dir(root.join("var/cache/apt/archives"))
        .map(|rd| rd.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".deb")).count())
        .unwrap_or(0);
    assert_eq!(debs, 0, "packages left in the image");
    let lists = std::fs::read_dir(root.join("var/lib/apt/lists"))
        .map(|rd| rd.flatten().filter(|e| e.file_type().is_ok_and(|t| t.is_file())).count())
        .unwrap_or(0);
    assert_eq!(lists, 0, "package lists left in the image");
    for e in std::fs::read_dir(root.join("dev")).unwrap().flatten() {
        let t = e.file_type().unwrap();
        assert!(!t.is_char_device() && !t.is_block_device(), "device node {:?}", e.path());
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(root.to_str().unwrap()), "{mounts}");
}

/// A store in miniature: the caller's check before a build is a lookup by
/// input digest.
fn store_lookup(store: &Path, digest: &str) -> Option<PathBuf> {
    let p = store.join(digest.trim_start_matches("sha256:"));
    p.exists().then_some(p)
}

#[test]
fn real_build_minimal_with_jq() {
    let Some(cache) = real_build_env() else { return };
    let mut s = BuildSpec::new(BuildBase::Recipe(repo_recipe("minimal")));
    s.apt = vec!["jq".into()];
    s.step_timeout = Duration::from_secs(600);
    let digest = input_digest(&s, "");
    let (stage, config, _) = timed_build(&s, &cache, "minimal+jq");
    let root = stage.path();
    assert!(root.join("usr/bin/jq").is_file());
    assert!(chroot_ok(root, &["/usr/bin/jq", "--version"]));
    assert!(chroot_ok(root, &["/bin/sh", "-c", "echo '{\"a\":1}' | jq -e .a"]));
    assert_eq!(config.working_dir, "/root");
    assert!(root.join("etc/passwd").is_file() && root.join("bin/busybox").exists());
    assert_clean_image(root);
    // The second build with the same inputs: the caller's store check.
    let store = tempfile::tempdir().unwrap();
    std::fs::write(store.path().join(digest.trim_start_matches("sha256:")), "image").unwrap();
    let started = Instant::now();
    let mut again = BuildSpec::new(BuildBase::Recipe(repo_recipe("minimal")));
    again.apt = vec!["jq".into()];
    let hit = store_lookup(store.path(), &input_digest(&again, ""));
    let took = started.elapsed();
    eprintln!("[minimal+jq] second build answered from the store check in {:.3}s", took.as_secs_f64());
    assert!(hit.is_some());
    assert!(took < Duration::from_secs(1));
}

#[test]
fn real_build_python_with_pandas_and_on_top_of_it() {
    let Some(cache) = real_build_env() else { return };
    let mut s = BuildSpec::new(BuildBase::Recipe(repo_recipe("python")));
    s.apt = vec!["python3-pandas".into()];
    s.step_timeout = Duration::from_secs(900);
    let (stage, config, _) = timed_build(&s, &cache, "python+pandas");
    let root = stage.path();
    assert!(chroot_ok(root, &["python3", "-c", "import pandas, numpy; print(pandas.__version__)"]));
    assert_eq!(config.cmd, ["python3"]);
    assert_clean_image(root);
    let digest = input_digest(&s, "");
    let mut again = BuildSpec::new(BuildBase::Recipe(repo_recipe("python")));
    again.apt = vec!["python3-pandas".into()];
    assert_eq!(input_digest(&again, ""), digest, "same inputs, same digest: the store answers the second build");

    // On top of that tree: apt (host apt + jailed dpkg), pip (jailed, with
    // network, python3-pip added on the way), run commands.
    let resolv_before = std::fs::read(root.join("etc/resolv.conf")).unwrap();
    let base_config = ImageConfig { env: vec![format!("PATH={DEFAULT_PATH}"), "FROM_BASE=1".into()], ..config };
    let mut t = BuildSpec::new(BuildBase::Tree { dir: root.to_path_buf(), config: base_config });
    t.apt = vec!["jq".into()];
    t.pip = vec!["tomli-w==1.0.0".into()];
    t.run = vec![
        "echo \"built $FROM_BASE\" > /root/marker".into(),
        "python3 -c 'import tomli_w, pandas; print(tomli_w.dumps({\"a\": 1}))'".into(),
    ];
    t.step_timeout = Duration::from_secs(600);
    let (stage2, config2, _) = timed_build(&t, &cache, "tree+jq+pip+run");
    let root2 = stage2.path();
    assert!(root2.join("usr/bin/jq").is_file());
    assert!(chroot_ok(root2, &["/usr/bin/jq", "--version"]));
    assert!(chroot_ok(root2, &["python3", "-c", "import tomli_w, pandas"]));
    assert_eq!(std::fs::read_to_string(root2.join("root/marker")).unwrap(), "built 1\n");
    assert_eq!(std::fs::read(root2.join("etc/resolv.conf")).unwrap(), resolv_before, "resolv.conf is left as it was");
    assert!(config2.env.contains(&"FROM_BASE=1".to_string()));
    assert_clean_image(root2);
    // The base tree is untouched.
    assert!(!root.join("usr/bin/jq").exists() && !root.join("root/marker").exists());
    // A failing command fails the build with its output.
    let mut f = BuildSpec::new(BuildBase::Tree { dir: root.to_path_buf(), config: ImageConfig::default() });
    f.run = vec!["echo about to fail; exit 3".into()];
    let stage3 = tempfile::Builder::new().prefix("test-stage-").tempdir_in(&cache).unwrap();
    match build(&f, stage3.path(), &cache, &mut |_| {}) {
        Err(ImageError::Invalid(m)) => assert!(m.contains("exit code 3") && m.contains("about to fail"), "{m}"),
        other => panic!("{other:?}"),
    }
}
