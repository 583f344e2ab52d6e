"""The sandbox's child side (run by evals/sandbox.py as `python -I -S sandbox_child.py ...`): read
the program from stdin, isolate (namespaces), set the limits, fork the process that runs it (pid 1
of a new process namespace when there is one) as user nobody under a guard, and exit with how that
process ended: 0 passed, 1 an exception (its line on stderr), 124 timed out, 128 + signal killed.
Standard library only, and it runs before any untrusted line, as the user that started it.
"""
import ctypes
import json
import os
import resource
import signal
import sys
import time

CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG = 1
NOBODY = 65534  # replaced by the parent's value (argv)


def isolate(libc):
    """Unshare the network and process namespaces (as root), or try a user namespace first."""
    flags = CLONE_NEWNET | CLONE_NEWPID | (0 if os.geteuid() == 0 else CLONE_NEWUSER)
    return hasattr(libc, "unshare") and libc.unshare(flags) == 0  # Linux only


def set_limits(limits, cpu_seconds):  # a CPU-time limit backs up the wall clock
    mb = 2 ** 20
    for what, value in ((resource.RLIMIT_AS, limits["memory_mb"] * mb),
                        (resource.RLIMIT_FSIZE, limits["file_mb"] * mb),
                        (resource.RLIMIT_NPROC, limits["processes"]),
                        (resource.RLIMIT_NOFILE, limits["open_files"]),
                        (resource.RLIMIT_CORE, 0), (resource.RLIMIT_CPU, cpu_seconds)):
        resource.setrlimit(what, (value, value))


def inside(workdir):
    """True if path (as given to open) lies in the program's own folder."""
    def check(path):
        if isinstance(path, int):  # an already open descriptor
            return True
        real = os.fsdecode(os.path.realpath(path))
        return real == workdir or real.startswith(workdir + os.sep)
    return check


def guard(workdir):
    """Disable what a test program never needs and a destructive one would use."""
    import builtins, faulthandler, io, shutil, subprocess
    faulthandler.disable()
    for name in ("kill", "killpg", "system", "popen", "fork", "forkpty", "posix_spawn",
                 "posix_spawnp", "execv", "execve", "execl", "execle", "execlp", "execvp",
                 "execvpe", "spawnv", "spawnve", "spawnl", "spawnle", "putenv", "unsetenv",
                 "remove", "unlink", "rmdir", "removedirs", "rename", "renames", "replace",
                 "truncate", "ftruncate", "chmod", "fchmod", "lchmod", "chown", "fchown", "lchown",
                 "chroot", "chdir", "fchdir", "setuid", "setgid", "setsid", "setpgid", "link",
                 "symlink", "_exit"):
        if hasattr(os, name):
            setattr(os, name, None)
    for name in ("rmtree", "move", "chown", "copytree"):
        setattr(shutil, name, None)
    subprocess.Popen = subprocess.run = subprocess.call = None
    builtins.exit = builtins.quit = builtins.help = None
    ok, real_open, real_os_open = inside(workdir), builtins.open, os.open

    def safe_open(file, mode="r", *args, **kwargs):  # writes only inside the folder
        if any(c in mode for c in "wax+") and not ok(file):
            raise PermissionError(f"sandbox: no writing outside the working folder: {file}")
        return real_open(file, mode, *args, **kwargs)

    def safe_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC) and not ok(path):
            raise PermissionError(f"sandbox: no writing outside the working folder: {path}")
        return real_os_open(path, flags, *args, **kwargs)
    builtins.open = io.open = safe_open
    os.open = safe_os_open
    for name in ("ctypes", "_ctypes", "resource", "socket", "_socket", "psutil", "tkinter",
                 "ipdb", "joblib", "multiprocessing"):
        sys.modules[name] = None  # `import name` now fails


def drop_user():
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)  # from here RLIMIT_NPROC is enforced and file rights apply


def run(source, workdir, libc, drop):
    """The forked process: drop to an unprivileged user, then run the program under the guard."""
    if drop:
        drop_user()
    if hasattr(libc, "prctl"):  # Linux: die with the bootstrap; set after setuid, which clears it
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    os.chdir(workdir)
    end = os._exit
    guard(workdir)
    try:
        exec(compile(source, "<program>", "exec"), {"__name__": "__main__"})
    except BaseException as e:
        print(type(e).__name__ + (f": {e}" if str(e) else ""), file=sys.stderr, flush=True)
        end(1)
    sys.stdout.flush()
    end(0)


def probe():
    """Can a process dropped to the sandbox user still import the standard library?"""
    pid = os.fork()
    if pid == 0:
        try:
            drop_user()
            import fractions  # not imported yet: read from disk as that user
            os._exit(0 if fractions else 1)
        except BaseException:
            os._exit(1)
    return os.waitpid(pid, 0)[1] == 0


def main():
    global NOBODY
    mode, workdir, limits, timeout = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), \
        float(sys.argv[4])
    NOBODY, drop = int(sys.argv[5]), sys.argv[6] == "1"
    libc = ctypes.CDLL(None, use_errno=True)
    source = sys.stdin.read()
    isolated = isolate(libc)
    if mode == "probe":
        print(json.dumps({"namespaces": isolated, "drops_user": os.geteuid() == 0 and probe()}))
        return
    set_limits(limits, int(timeout) + 1)
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)  # its own group, which the timeout kills whole
        exit_now = os._exit  # the guard removes it from os
        try:
            run(source, workdir, libc, drop)  # exits itself; returns only by an exception
        finally:
            exit_now(1)  # never back into this function's parent side
    os._exit(wait_for(pid, timeout))


def wait_for(pid, timeout):
    """The child's exit code (128 + signal if killed), or 124 once it has run `timeout` seconds.

    Killing it here rather than from outside means this process reaps it: as pid 1 of its own
    namespace, its death takes every process it started with it, and no orphan is left behind.
    """
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
        if time.monotonic() > deadline:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            os.waitpid(pid, 0)
            return 124
        time.sleep(0.005)


if __name__ == "__main__":
    main()
