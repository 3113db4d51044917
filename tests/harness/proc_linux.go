//go:build linux

package harness

import "syscall"

// procAttr makes the kernel kill the server if the test process dies
// without running its cleanups.
func procAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
