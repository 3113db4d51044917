//go:build linux

package cache

import "syscall"

// mapArena returns n bytes of anonymous memory outside the Go heap: the
// kernel backs a page only once it is written, and the garbage collector
// neither scans nor counts it. Transparent huge pages are asked for (where
// the kernel leaves them to madvise): filling the arena then faults once
// per 2 MiB instead of once per 4 KiB.
func mapArena(n int) ([]byte, error) {
	b, err := syscall.Mmap(-1, 0, n, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE)
	if err != nil {
		return nil, err
	}
	_ = syscall.Madvise(b, syscall.MADV_HUGEPAGE) // a hint: failure is harmless
	return b, nil
}

// unmapArena releases memory from mapArena.
func unmapArena(b []byte) { _ = syscall.Munmap(b) }
