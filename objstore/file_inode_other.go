//go:build !unix

package objstore

import "io/fs"

// fileInode returns 0: this platform exposes no inode numbers.
func fileInode(fs.FileInfo) uint64 { return 0 }
