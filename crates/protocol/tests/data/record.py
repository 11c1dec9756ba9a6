#!/usr/bin/python3
"""Record byte-exact worker- and serve-protocol sessions of real Nix 2.8.

Usage: record.py [OUT_DIR]     (default: the directory of this script)

Everything lives in a fresh scratch directory under /tmp (removed at the end); /nix and
/etc/nix are never touched:

  SCRATCH/etc/nix.conf   NIX_CONF_DIR for daemon and clients: sandbox on, /bin/sh is the
                         static /bin/busybox inside the sandbox, no substituters, no
                         build users (run as root)
  SCRATCH/root           the daemon's chroot store (logical store dir /nix/store)
  SCRATCH/daemon.sock    `nix-daemon --store SCRATCH/root` (NIX_DAEMON_SOCKET_PATH)
  SCRATCH/proxy.sock     this script's recording proxy in front of it

Worker sessions: each client command connects to
`unix://SCRATCH/proxy.sock?root=SCRATCH/root`; the proxy forwards every byte and writes
each connection's two directions to OUT/worker/<session>.c2s and .s2c (one connection
per command, checked). Serve sessions: `nix copy` to / from
`ssh://localhost?remote-program=SCRATCH/serve-tee&remote-store=SCRATCH/root2` (Nix 2.8
runs `localhost` without ssh), where serve-tee is `tee c2s | nix-store "$@" | tee s2c`;
written to OUT/serve/<session>.c2s and .s2c.

The sessions and what each contains are listed in README.md next to this script.
"""
import os, shutil, socket, subprocess, sys, tempfile, threading, time

OUT = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
S = tempfile.mkdtemp(prefix="firn-proto-rec.", dir="/tmp")
ROOT, ROOT2 = S + "/root", S + "/root2"
DSOCK, PSOCK = S + "/daemon.sock", S + "/proxy.sock"
STORE = "unix://%s?root=%s" % (PSOCK, ROOT)

os.makedirs(S + "/etc")
os.makedirs(S + "/home")
with open(S + "/etc/nix.conf", "w") as f:
    f.write("sandbox = true\nsandbox-paths = /bin/sh=/bin/busybox\nsubstituters =\n"
            "build-users-group =\nexperimental-features = nix-command\n")
ENV = {"PATH": "/usr/bin:/bin", "HOME": S + "/home", "NIX_CONF_DIR": S + "/etc",
       "XDG_CACHE_HOME": S + "/home/.cache", "NIX_STATE_DIR": S + "/state",
       "TERM": "dumb"}

conns = []          # (c2s bytearray, s2c bytearray) per accepted connection
conn_lock = threading.Lock()


def pump(src, dst, buf):
    while True:
        b = src.recv(1 << 16)
        if not b:
            break
        buf += b
        dst.sendall(b)
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def serve_proxy(lsock):
    while True:
        try:
            c, _ = lsock.accept()
        except OSError:
            return
        d = socket.socket(socket.AF_UNIX)
        d.connect(DSOCK)
        rec = (bytearray(), bytearray())
        with conn_lock:
            conns.append(rec)
        threading.Thread(target=pump, args=(c, d, rec[0]), daemon=True).start()
        threading.Thread(target=pump, args=(d, c, rec[1]), daemon=True).start()


def run(*cmd, ok=True, **kw):
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, **kw)
    if ok and p.returncode != 0:
        sys.exit("failed (%d): %s\n%s" % (p.returncode, " ".join(cmd), p.stderr))
    return p.stdout.strip()


def session(name, *cmd, ok=True):
    """Run one client command through the proxy; save its single connection."""
    with conn_lock:
        before = len(conns)
    out = run(*cmd, ok=ok)
    time.sleep(0.3)
    with conn_lock:
        new = conns[before:]
    if len(new) != 1:
        sys.exit("%s: expected one connection, got %d" % (name, len(new)))
    c2s, s2c = new[0]
    os.makedirs(OUT + "/worker", exist_ok=True)
    open(OUT + "/worker/%s.c2s" % name, "wb").write(bytes(c2s))
    open(OUT + "/worker/%s.s2c" % name, "wb").write(bytes(s2c))
    print("worker/%s: %d bytes c2s, %d bytes s2c" % (name, len(c2s), len(s2c)))
    return out


def main():
    env = dict(ENV, NIX_DAEMON_SOCKET_PATH=DSOCK)
    daemon = subprocess.Popen(["nix-daemon", "--store", ROOT], env=env,
                              stdout=subprocess.DEVNULL, stderr=open(S + "/daemon.log", "w"))
    try:
        for _ in range(100):
            if os.path.exists(DSOCK):
                break
            time.sleep(0.1)
        lsock = socket.socket(socket.AF_UNIX)
        lsock.bind(PSOCK)
        lsock.listen(8)
        threading.Thread(target=serve_proxy, args=(lsock,), daemon=True).start()

        with open(S + "/hello.txt", "w") as f:
            f.write("hello from firn's protocol vectors\n")
        p = session("add", "nix-store", "--store", STORE, "--add", S + "/hello.txt")
        session("is-valid", "nix-store", "--store", STORE, "--check-validity", p)
        session("query-path-info", "nix-store", "--store", STORE, "-q", "--hash", p)
        with open(S + "/ok.nix", "w") as f:
            f.write('derivation { name = "firn-vec"; system = "x86_64-linux"; '
                    'builder = "/bin/sh"; src = %s; '
                    'args = [ "-c" "echo building; echo to stderr >&2; cat $src > $out" ]; }\n' % (S + "/hello.txt"))
        session("build", "nix-build", "--store", STORE, "--option", "connect-timeout", "7",
                S + "/ok.nix", "-o", S + "/result")
        with open(S + "/fail.nix", "w") as f:
            f.write('derivation { name = "firn-vec-fail"; system = "x86_64-linux"; '
                    'builder = "/bin/sh"; args = [ "-c" "echo about to fail; exit 3" ]; }\n')
        session("build-fail", "nix-build", "--store", STORE, S + "/fail.nix", "--no-out-link", ok=False)
        session("gc-print-dead", "nix-store", "--store", STORE, "--gc", "--print-dead")
        session("verify", "nix-store", "--store", STORE, "--verify")

        # Serve protocol, through a tee around nix-store --serve.
        tee = S + "/serve-tee"
        with open(tee, "w") as f:
            f.write('#!/bin/sh\ntee -a "$FIRN_REC.c2s" | nix-store "$@" | tee -a "$FIRN_REC.s2c"\n')
        os.chmod(tee, 0o755)
        os.makedirs(OUT + "/serve", exist_ok=True)
        out = os.path.realpath(S + "/result")
        out = "/nix/store/" + os.path.basename(out)
        remote = "ssh://localhost?remote-program=%s&remote-store=%s" % (tee, ROOT2)
        for name, args in [("copy-to", ["--to", remote]), ("copy-from", ["--from", remote])]:
            rec = OUT + "/serve/" + name
            for ext in (".c2s", ".s2c"):
                if os.path.exists(rec + ext):
                    os.remove(rec + ext)
            ENV["FIRN_REC"] = rec
            target = ROOT if name == "copy-to" else S + "/root3"
            run("nix", "--store", target, "copy", "--no-check-sigs", *args, out)
            print("serve/%s: %d bytes c2s, %d bytes s2c" % (
                name, os.path.getsize(rec + ".c2s"), os.path.getsize(rec + ".s2c")))
        with open(OUT + "/paths.txt", "w") as f:
            f.write("added %s\nbuilt %s\n" % (p, out))
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(S, ignore_errors=True)


main()
