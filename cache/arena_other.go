//go:build !linux

package cache

// mapArena returns n bytes from the Go heap where anonymous mappings are
// not available.
func mapArena(n int) ([]byte, error) { return make([]byte, n), nil }

// unmapArena leaves b to the garbage collector.
func unmapArena(b []byte) {}
