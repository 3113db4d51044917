//go:build !linux

package harness

import "syscall"

// procAttr returns nil: only Linux can tie the server's life to ours.
func procAttr() *syscall.SysProcAttr { return nil }
