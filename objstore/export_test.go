package objstore

// SetCopyPartSize sets the multipart copy part size of ReplaceMetadata
// and returns a function restoring it.
func SetCopyPartSize(n int64) func() {
	old := copyPartSize
	copyPartSize = n
	return func() { copyPartSize = old }
}
