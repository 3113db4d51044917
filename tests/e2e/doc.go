// Package e2e runs the real snapfs binary, built once by TestMain, against
// images made by QEMU's tools (tests/images), over file://, s3:// on a real
// MinIO (tests/harness) and pre-signed http URLs, and compares what it says
// and reads with qemu-img.
//
// Run: go test ./tests/e2e/ (needs qemu-img, qemu-io, bunzip2 and the
// minio binary that scripts/test-deps installs).
package e2e
