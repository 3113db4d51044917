package cache

import (
	"os"
	"syscall"
)

// allocatedBytes is the space a file takes on disk.
func allocatedBytes(fi os.FileInfo) int64 {
	return fi.Sys().(*syscall.Stat_t).Blocks * 512
}
