// Package objstore is the object-store layer of snapfs: one Store interface,
// its backends (s3, https, file) and the wrappers layered around any Store
// (retry, version pinning, metrics).
//
// Open turns a URL (s3://, https://, http://, file:// or a plain path) into
// a Store and a key. A typical reader stacks the wrappers as
//
//	st = WithPinning(WithRetry(WithMetrics(backend, m), RetryPolicy{}))
//
// so that metrics count every real request, retries resume short reads
// under the pinned ETag, and a changed object fails with ErrChanged
// instead of being retried.
package objstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"
)

// ObjectInfo describes one stored object.
type ObjectInfo struct {
	Key          string            // key inside the store
	Size         int64             // size in bytes
	ETag         string            // entity tag, without quotes
	LastModified time.Time         // last modification time
	Metadata     map[string]string // user metadata, keys lower case without the x-amz-meta- prefix
}

// ReadOptions qualify a ranged read.
type ReadOptions struct {
	// IfMatch, when set, makes the read fail with ErrChanged unless the
	// object's current ETag equals it.
	IfMatch string
}

// Part is one uploaded part of a multipart upload.
type Part struct {
	Number int    // 1-based part number
	ETag   string // ETag the store returned for the part
	Size   int64  // bytes in the part
}

// Reader reads objects.
type Reader interface {
	// Stat returns the object's size, ETag, modification time and metadata.
	Stat(ctx context.Context, key string) (ObjectInfo, error)
	// ReadAt fills p from the object at offset off with one ranged read.
	// Like io.ReaderAt it returns n < len(p) only with an error; a range that
	// runs past the end of the object returns the bytes up to it and io.EOF.
	ReadAt(ctx context.Context, key string, p []byte, off int64, opts ReadOptions) (int, error)
}

// Lister lists objects.
type Lister interface {
	// List returns every object whose key starts with prefix, in key order.
	List(ctx context.Context, prefix string) ([]ObjectInfo, error)
}

// Writer creates and deletes objects.
type Writer interface {
	// Put stores size bytes from r as key; the object becomes visible only
	// when complete.
	Put(ctx context.Context, key string, r io.Reader, size int64, meta map[string]string) error
	// Delete removes key. Deleting a missing key is not an error.
	Delete(ctx context.Context, key string) error
}

// Multipart uploads an object in parts, which may arrive in any order.
type Multipart interface {
	// CreateMultipart starts an upload of key and returns its upload ID.
	CreateMultipart(ctx context.Context, key string, meta map[string]string) (string, error)
	// UploadPart stores part number (1-based) of the upload.
	UploadPart(ctx context.Context, key, uploadID string, number int, r io.Reader, size int64) (Part, error)
	// CompleteMultipart assembles the parts, in number order, into the object.
	CompleteMultipart(ctx context.Context, key, uploadID string, parts []Part) error
	// AbortMultipart discards the upload and its parts.
	AbortMultipart(ctx context.Context, key, uploadID string) error
}

// Store is everything snapfs needs of an object store.
type Store interface {
	Reader
	Lister
	Writer
	Multipart
	// URL names key for humans (logs and errors): scheme, bucket or
	// directory, and key, never a signature or credential.
	URL(key string) string
}

// Sentinel errors; backends wrap them in *Error so errors.Is works.
var (
	ErrNotFound     = errors.New("object not found")
	ErrChanged      = errors.New("object changed since it was opened")
	ErrForbidden    = errors.New("access denied")
	ErrNotSupported = errors.New("operation not supported by this store")
	ErrRange        = errors.New("requested range not satisfiable")
)

// Error is the error type of every backend and wrapper. It names the
// operation and the object (as Store.URL gives it, so without secrets).
type Error struct {
	Op     string // "stat", "read", "list", "put", ...
	URL    string // the object, as Store.URL(key)
	Status int    // HTTP status when there was one, else 0
	Err    error  // the cause
}

func (e *Error) Error() string {
	if e.Status != 0 && !errors.Is(e.Err, ErrChanged) && !errors.Is(e.Err, ErrNotFound) && !errors.Is(e.Err, ErrForbidden) {
		return fmt.Sprintf("%s %s: HTTP %d: %v", e.Op, e.URL, e.Status, e.Err)
	}
	return fmt.Sprintf("%s %s: %v", e.Op, e.URL, e.Err)
}

// Unwrap returns the cause.
func (e *Error) Unwrap() error { return e.Err }

// MetadataReplacer is implemented by stores that can replace the user
// metadata of an existing object without uploading it again (S3 by a
// server-side copy onto itself; the file store by rewriting its sidecar).
type MetadataReplacer interface {
	// ReplaceMetadata sets key's user metadata to meta, if key still has
	// the given ETag (any ETag when etag is empty).
	ReplaceMetadata(ctx context.Context, key, etag string, meta map[string]string) error
}
