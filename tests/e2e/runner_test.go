package e2e

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
)

// The runner measures the CLI's memory. The maximum RSS that wait4 reports
// for a direct child of this test process is useless: Go starts children
// with vfork, and Linux counts the parent's resident memory, shared until
// exec, in the child's high-water mark. So the CLI is started by a runner
// (this test binary again, with runnerEnv set), small when it forks, which
// caps the CLI's address space, runs it with the same stdin, stdout and
// stderr, and writes its exit status and max RSS to a file.
const runnerEnv = "SNAPFS_E2E_RUNNER"

// asLimit caps the CLI's address space: a safety net against runaway
// allocations (the Go runtime alone reserves about 1 GiB, so the memory
// bound proper is checked on the max RSS).
const asLimit = 4 << 30

// runnerMain is the runner: args are the report file, the program and its
// arguments.
func runnerMain(args []string) int {
	if len(args) < 2 {
		fmt.Fprintln(os.Stderr, "runner: usage: REPORT PROGRAM ARGS...")
		return 125
	}
	report, prog := args[0], args[1]
	lim := syscall.Rlimit{Cur: asLimit, Max: asLimit}
	if err := syscall.Setrlimit(syscall.RLIMIT_AS, &lim); err != nil {
		fmt.Fprintln(os.Stderr, "runner: setrlimit:", err)
		return 125
	}
	cmd := exec.Command(prog, args[2:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	env := os.Environ()[:0]
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, runnerEnv+"=") {
			env = append(env, kv)
		}
	}
	cmd.Env = env
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		fmt.Fprintln(os.Stderr, "runner:", err)
		return 125
	}
	var maxRSS int64
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		maxRSS = ru.Maxrss << 10 // KiB on Linux
	}
	ws, _ := cmd.ProcessState.Sys().(syscall.WaitStatus)
	line := fmt.Sprintf("exit %d %d\n", ws.ExitStatus(), maxRSS)
	if ws.Signaled() {
		line = fmt.Sprintf("signal %d %d\n", int(ws.Signal()), maxRSS)
	}
	if err := os.WriteFile(report, []byte(line), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "runner:", err)
		return 125
	}
	if ws.Signaled() {
		return 128 + int(ws.Signal())
	}
	return ws.ExitStatus()
}

type runnerReport struct {
	code   int
	signal string // set when the CLI was killed by a signal
	maxRSS int64  // bytes
}

func readRunnerReport(path string) (runnerReport, error) {
	var r runnerReport
	b, err := os.ReadFile(path)
	if err != nil {
		return r, err
	}
	var kind string
	var n int
	if _, err := fmt.Sscanf(string(b), "%s %d %d", &kind, &n, &r.maxRSS); err != nil {
		return r, fmt.Errorf("report %q: %v", b, err)
	}
	switch kind {
	case "exit":
		r.code = n
	case "signal":
		r.code = -1
		r.signal = syscall.Signal(n).String()
	default:
		return r, fmt.Errorf("report %q", b)
	}
	return r, nil
}
