package nbd

import (
	"errors"
	"syscall"

	"github.com/snapfs/snapfs/disk"
)

// errno maps a Device error to the NBD error value sent to the client:
// disk.ErrReadOnly is EPERM, disk.ErrOutOfRange EINVAL, a full or
// over-quota backend ENOSPC, and everything else (context cancellation
// included) EIO.
func errno(err error) uint32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, disk.ErrReadOnly):
		return errPerm
	case errors.Is(err, disk.ErrOutOfRange):
		return errInval
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return errNoSpc
	default:
		return errIO
	}
}

// errnoText is the message of a structured error chunk. It names the error
// class only: the Device's own error text can carry object-store URLs and is
// logged on the server instead of being sent to clients.
func errnoText(e uint32) string {
	switch e {
	case errPerm:
		return "operation not permitted: export is read-only"
	case errIO:
		return "input/output error"
	case errNoMem:
		return "cannot allocate memory"
	case errInval:
		return "invalid argument"
	case errNoSpc:
		return "no space left on device"
	case errOverflow:
		return "request too large"
	case errNotSup:
		return "operation not supported"
	case errShutdown:
		return "server is shutting down"
	default:
		return "error"
	}
}
