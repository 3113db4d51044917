//go:build unix

package objstore

import (
	"io/fs"
	"syscall"
)

// fileInode returns fi's inode number, or 0 when the platform gives none.
func fileInode(fi fs.FileInfo) uint64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return uint64(st.Ino)
	}
	return 0
}
