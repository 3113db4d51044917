package objstore

import (
	"context"
	"crypto/md5"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
)

// Names of the file store's internal files. All start with a dot, and List
// never returns them.
const (
	fileInternalPrefix = ".snapfs-"          // temp files and the uploads directory
	fileMetaSuffix     = ".snapfs-meta.json" // sidecar: "." + name + fileMetaSuffix
	fileUploadsDir     = ".snapfs-uploads"   // multipart uploads, one directory each
	fileUploadManifest = "upload.json"
	maxPartNumber      = 10000
)

// FileStore is a Store over a local directory. Keys are slash-separated
// paths relative to the root; every access goes through an os.Root, so
// neither ".." nor a symbolic link can reach outside it.
//
// ETags are derived from size, modification time (ns) and inode. User
// metadata lives in a hidden sidecar file next to the object. Put and
// CompleteMultipart write a hidden temporary file and rename it, so a
// partial object is never visible.
type FileStore struct {
	dir  string
	root *os.Root
}

var _ Store = (*FileStore)(nil)

// NewFileStore returns a store rooted at the existing directory dir.
func NewFileStore(dir string) (*FileStore, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, &Error{Op: "open", URL: fileURL(dir, ""), Err: err}
	}
	root, err := os.OpenRoot(abs)
	if err != nil {
		return nil, fsError("open", fileURL(abs, ""), err)
	}
	return &FileStore{dir: abs, root: root}, nil
}

// Dir returns the store's root directory.
func (s *FileStore) Dir() string { return s.dir }

// URL returns file:///root/key.
func (s *FileStore) URL(key string) string { return fileURL(s.dir, key) }

func fileURL(dir, key string) string {
	p := filepath.ToSlash(dir)
	if !strings.HasSuffix(p, "/") {
		p += "/"
	}
	return "file://" + p + strings.TrimPrefix(key, "/")
}

// isInternalName reports whether a path element names one of the store's
// own files.
func isInternalName(name string) bool {
	return strings.HasPrefix(name, fileInternalPrefix) ||
		(strings.HasPrefix(name, ".") && strings.HasSuffix(name, fileMetaSuffix))
}

// checkKey validates an object key: relative, slash-separated, no empty,
// "." or ".." elements, no internal names.
func checkKey(key string) error {
	if key == "" {
		return fmt.Errorf("%w: empty key", ErrInvalidKey)
	}
	if strings.HasPrefix(key, "/") {
		return fmt.Errorf("%w: %q is absolute", ErrInvalidKey, key)
	}
	if strings.ContainsRune(key, 0) {
		return fmt.Errorf("%w: NUL in key", ErrInvalidKey)
	}
	for seg := range strings.SplitSeq(key, "/") {
		switch {
		case seg == "..":
			return fmt.Errorf("%w: %q escapes the store's root", ErrInvalidKey, key)
		case seg == "" || seg == ".":
			return fmt.Errorf("%w: %q is not a clean relative path", ErrInvalidKey, key)
		case isInternalName(seg):
			return fmt.Errorf("%w: %q names an internal file", ErrInvalidKey, key)
		}
	}
	return nil
}

// fsError maps an os error to the store's sentinels.
func fsError(op, u string, err error) *Error {
	switch {
	case errors.Is(err, fs.ErrNotExist), errors.Is(err, syscall.ENOTDIR):
		return &Error{Op: op, URL: u, Err: ErrNotFound}
	case errors.Is(err, fs.ErrPermission):
		return &Error{Op: op, URL: u, Err: fmt.Errorf("%w: %v", ErrForbidden, errors.Unwrap(err))}
	case strings.Contains(err.Error(), "path escapes from parent"):
		return &Error{Op: op, URL: u, Err: fmt.Errorf("%w: path escapes the store's root", ErrInvalidKey)}
	}
	return &Error{Op: op, URL: u, Err: err}
}

// fileETag is the ETag of a file: size, mtime in ns and inode, in hex.
func fileETag(fi fs.FileInfo) string {
	return fmt.Sprintf("%x-%x-%x", fi.Size(), fi.ModTime().UnixNano(), fileInode(fi))
}

func sidecarName(key string) string {
	dir, base := path.Split(key)
	return dir + "." + base + fileMetaSuffix
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Stat returns the object's size, ETag, mtime and sidecar metadata.
func (s *FileStore) Stat(ctx context.Context, key string) (ObjectInfo, error) {
	u := s.URL(key)
	if err := checkKey(key); err != nil {
		return ObjectInfo{}, &Error{Op: "stat", URL: u, Err: err}
	}
	if err := ctx.Err(); err != nil {
		return ObjectInfo{}, &Error{Op: "stat", URL: u, Err: err}
	}
	fi, err := s.root.Stat(key)
	if err != nil {
		return ObjectInfo{}, fsError("stat", u, err)
	}
	if !fi.Mode().IsRegular() {
		return ObjectInfo{}, &Error{Op: "stat", URL: u, Err: ErrNotFound}
	}
	info := ObjectInfo{Key: key, Size: fi.Size(), ETag: fileETag(fi), LastModified: fi.ModTime()}
	meta, err := s.readMeta(key)
	if err != nil {
		return ObjectInfo{}, &Error{Op: "stat", URL: u, Err: err}
	}
	info.Metadata = meta
	return info, nil
}

func (s *FileStore) readMeta(key string) (map[string]string, error) {
	b, err := s.root.ReadFile(sidecarName(key))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("metadata sidecar: %w", err)
	}
	var meta map[string]string
	if err := json.Unmarshal(b, &meta); err != nil {
		return nil, fmt.Errorf("metadata sidecar: %w", err)
	}
	return meta, nil
}

// writeMeta replaces key's sidecar (through a temp file and a rename), or
// removes it when meta is empty.
func (s *FileStore) writeMeta(key string, meta map[string]string) error {
	name := sidecarName(key)
	if len(meta) == 0 {
		if err := s.root.Remove(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		return nil
	}
	norm := make(map[string]string, len(meta))
	for k, v := range meta {
		norm[strings.ToLower(k)] = v
	}
	b, err := json.Marshal(norm)
	if err != nil {
		return err
	}
	tmp := path.Join(path.Dir(key), fileInternalPrefix+"tmp-"+randomHex(8))
	if err := s.root.WriteFile(tmp, b, 0o644); err != nil {
		return err
	}
	if err := s.root.Rename(tmp, name); err != nil {
		_ = s.root.Remove(tmp)
		return err
	}
	return nil
}

// ReadAt reads len(p) bytes at off with pread. With opts.IfMatch the
// object's ETag is checked before the read and again after it, so an
// overwrite during the read is reported as ErrChanged.
func (s *FileStore) ReadAt(ctx context.Context, key string, p []byte, off int64, opts ReadOptions) (int, error) {
	u := s.URL(key)
	if err := checkKey(key); err != nil {
		return 0, &Error{Op: "read", URL: u, Err: err}
	}
	if off < 0 {
		return 0, &Error{Op: "read", URL: u, Err: fmt.Errorf("%w: negative offset %d", ErrRange, off)}
	}
	if err := ctx.Err(); err != nil {
		return 0, &Error{Op: "read", URL: u, Err: err}
	}
	f, err := s.root.Open(key)
	if err != nil {
		return 0, fsError("read", u, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return 0, fsError("read", u, err)
	}
	if !fi.Mode().IsRegular() {
		return 0, &Error{Op: "read", URL: u, Err: ErrNotFound}
	}
	if opts.IfMatch != "" && fileETag(fi) != opts.IfMatch {
		return 0, &Error{Op: "read", URL: u, Err: ErrChanged}
	}
	if len(p) == 0 {
		return 0, nil
	}
	n, err := f.ReadAt(p, off)
	if err != nil && err != io.EOF {
		return n, fsError("read", u, err)
	}
	if opts.IfMatch != "" {
		after, serr := s.root.Stat(key)
		if serr != nil || fileETag(after) != opts.IfMatch {
			return 0, &Error{Op: "read", URL: u, Err: ErrChanged}
		}
	}
	return n, err
}

// List walks the tree below the directory part of prefix and returns every
// object whose key starts with prefix, in key order. Internal files are
// skipped and Metadata is not filled in.
func (s *FileStore) List(ctx context.Context, prefix string) ([]ObjectInfo, error) {
	u := s.URL(prefix)
	start := "."
	if i := strings.LastIndex(prefix, "/"); i >= 0 {
		start = prefix[:i]
		if err := checkKey(start); err != nil {
			return nil, &Error{Op: "list", URL: u, Err: err}
		}
	}
	var out []ObjectInfo
	err := fs.WalkDir(s.root.FS(), start, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if p == start && (errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR)) {
				return fs.SkipAll
			}
			return err
		}
		if err := ctx.Err(); err != nil {
			return err
		}
		if p != "." && isInternalName(d.Name()) {
			if d.IsDir() {
				return fs.SkipDir
			}
			return nil
		}
		if d.IsDir() {
			if p != "." && !strings.HasPrefix(p+"/", prefix) && !strings.HasPrefix(prefix, p+"/") {
				return fs.SkipDir
			}
			return nil
		}
		if !strings.HasPrefix(p, prefix) {
			return nil
		}
		var fi fs.FileInfo
		if d.Type()&fs.ModeSymlink != 0 {
			fi, err = s.root.Stat(p)
			if err != nil {
				return nil // dangling or escaping link: not an object
			}
		} else if fi, err = d.Info(); err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // removed while walking
			}
			return err
		}
		if !fi.Mode().IsRegular() {
			return nil
		}
		out = append(out, ObjectInfo{Key: p, Size: fi.Size(), ETag: fileETag(fi), LastModified: fi.ModTime()})
		return nil
	})
	if err != nil {
		if cerr := ctx.Err(); cerr != nil {
			err = cerr
		}
		return nil, fsError("list", u, err)
	}
	slices.SortFunc(out, func(a, b ObjectInfo) int { return strings.Compare(a.Key, b.Key) })
	return out, nil
}

// ctxReader fails reads once its context is done.
type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// writeTemp copies size bytes (all of r when size < 0) into a new hidden
// temp file in dir and returns its name, byte count and MD5. On error the
// temp file is removed.
func (s *FileStore) writeTemp(ctx context.Context, dir string, r io.Reader, size int64) (string, int64, string, error) {
	if dir != "." {
		if err := s.root.MkdirAll(dir, 0o755); err != nil {
			return "", 0, "", err
		}
	}
	tmp := path.Join(dir, fileInternalPrefix+"tmp-"+randomHex(8))
	f, err := s.root.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return "", 0, "", err
	}
	h := md5.New()
	src := io.Reader(ctxReader{ctx, r})
	if size >= 0 {
		src = io.LimitReader(src, size)
	}
	n, err := io.Copy(io.MultiWriter(f, h), src)
	if err == nil && size >= 0 && n < size {
		err = fmt.Errorf("body ended after %d of %d bytes: %w", n, size, io.ErrUnexpectedEOF)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = s.root.Remove(tmp)
		return "", 0, "", err
	}
	return tmp, n, hex.EncodeToString(h.Sum(nil)), nil
}

// Put writes r to a hidden temp file next to key and renames it into
// place. size < 0 copies r to its end.
func (s *FileStore) Put(ctx context.Context, key string, r io.Reader, size int64, meta map[string]string) error {
	u := s.URL(key)
	if err := checkKey(key); err != nil {
		return &Error{Op: "put", URL: u, Err: err}
	}
	tmp, _, _, err := s.writeTemp(ctx, path.Dir(key), r, size)
	if err != nil {
		return fsError("put", u, err)
	}
	if err := s.publish(tmp, key, meta); err != nil {
		return fsError("put", u, err)
	}
	return nil
}

// publish writes key's metadata and renames tmp to key.
func (s *FileStore) publish(tmp, key string, meta map[string]string) error {
	if err := s.writeMeta(key, meta); err != nil {
		_ = s.root.Remove(tmp)
		return err
	}
	if err := s.root.Rename(tmp, key); err != nil {
		_ = s.root.Remove(tmp)
		return err
	}
	return nil
}

// Delete removes key and its metadata; a missing key is not an error.
func (s *FileStore) Delete(ctx context.Context, key string) error {
	u := s.URL(key)
	if err := checkKey(key); err != nil {
		return &Error{Op: "delete", URL: u, Err: err}
	}
	if err := ctx.Err(); err != nil {
		return &Error{Op: "delete", URL: u, Err: err}
	}
	fi, err := s.root.Lstat(key)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR) {
			return nil
		}
		return fsError("delete", u, err)
	}
	if fi.IsDir() {
		return nil // a directory is not an object
	}
	if err := s.root.Remove(key); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fsError("delete", u, err)
	}
	if err := s.root.Remove(sidecarName(key)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fsError("delete", u, err)
	}
	return nil
}

type fileUpload struct {
	Key  string            `json:"key"`
	Meta map[string]string `json:"meta,omitempty"`
}

func uploadDir(id string) string { return fileUploadsDir + "/" + id }

func partName(id string, number int) string {
	return fmt.Sprintf("%s/part-%05d", uploadDir(id), number)
}

// openUpload checks that id is an upload of key and returns its manifest.
func (s *FileStore) openUpload(key, id string) (fileUpload, error) {
	var up fileUpload
	if len(id) != 32 {
		return up, fmt.Errorf("upload %q: %w", id, ErrNotFound)
	}
	if _, err := hex.DecodeString(id); err != nil {
		return up, fmt.Errorf("upload %q: %w", id, ErrNotFound)
	}
	b, err := s.root.ReadFile(uploadDir(id) + "/" + fileUploadManifest)
	if errors.Is(err, fs.ErrNotExist) {
		return up, fmt.Errorf("upload %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return up, err
	}
	if err := json.Unmarshal(b, &up); err != nil {
		return up, fmt.Errorf("upload %s manifest: %w", id, err)
	}
	if up.Key != key {
		return up, fmt.Errorf("upload %s is not an upload of this key: %w", id, ErrNotFound)
	}
	return up, nil
}

// CreateMultipart starts an upload in a hidden directory under the root.
func (s *FileStore) CreateMultipart(ctx context.Context, key string, meta map[string]string) (string, error) {
	u := s.URL(key)
	if err := checkKey(key); err != nil {
		return "", &Error{Op: "create-multipart", URL: u, Err: err}
	}
	if err := ctx.Err(); err != nil {
		return "", &Error{Op: "create-multipart", URL: u, Err: err}
	}
	id := randomHex(16)
	b, err := json.Marshal(fileUpload{Key: key, Meta: meta})
	if err != nil {
		return "", &Error{Op: "create-multipart", URL: u, Err: err}
	}
	if err := s.root.MkdirAll(uploadDir(id), 0o755); err != nil {
		return "", fsError("create-multipart", u, err)
	}
	if err := s.root.WriteFile(uploadDir(id)+"/"+fileUploadManifest, b, 0o644); err != nil {
		_ = s.root.RemoveAll(uploadDir(id))
		return "", fsError("create-multipart", u, err)
	}
	return id, nil
}

// UploadPart stores part number of the upload; uploading a number again
// replaces that part. The part's ETag is its MD5 in hex.
func (s *FileStore) UploadPart(ctx context.Context, key, uploadID string, number int, r io.Reader, size int64) (Part, error) {
	u := s.URL(key)
	if err := checkKey(key); err != nil {
		return Part{}, &Error{Op: "upload-part", URL: u, Err: err}
	}
	if number < 1 || number > maxPartNumber {
		return Part{}, &Error{Op: "upload-part", URL: u, Err: fmt.Errorf("part number %d outside 1..%d", number, maxPartNumber)}
	}
	if _, err := s.openUpload(key, uploadID); err != nil {
		return Part{}, fsError("upload-part", u, err)
	}
	tmp, n, sum, err := s.writeTemp(ctx, uploadDir(uploadID), r, size)
	if err != nil {
		return Part{}, fsError("upload-part", u, err)
	}
	if err := s.root.Rename(tmp, partName(uploadID, number)); err != nil {
		_ = s.root.Remove(tmp)
		return Part{}, fsError("upload-part", u, err)
	}
	return Part{Number: number, ETag: sum, Size: n}, nil
}

// CompleteMultipart concatenates the parts in number order into a temp
// file, checking each part's ETag, then renames it into place and removes
// the upload.
func (s *FileStore) CompleteMultipart(ctx context.Context, key, uploadID string, parts []Part) error {
	u := s.URL(key)
	if err := checkKey(key); err != nil {
		return &Error{Op: "complete-multipart", URL: u, Err: err}
	}
	up, err := s.openUpload(key, uploadID)
	if err != nil {
		return fsError("complete-multipart", u, err)
	}
	if len(parts) == 0 {
		return &Error{Op: "complete-multipart", URL: u, Err: errors.New("no parts")}
	}
	sorted := slices.Clone(parts)
	slices.SortFunc(sorted, func(a, b Part) int { return a.Number - b.Number })
	for i := 1; i < len(sorted); i++ {
		if sorted[i].Number == sorted[i-1].Number {
			return &Error{Op: "complete-multipart", URL: u, Err: fmt.Errorf("part %d listed twice", sorted[i].Number)}
		}
	}
	var readers []io.Reader
	var files []*os.File
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	hashes := make([]*partCheck, len(sorted))
	for i, p := range sorted {
		f, err := s.root.Open(partName(uploadID, p.Number))
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return &Error{Op: "complete-multipart", URL: u, Err: fmt.Errorf("part %d was not uploaded", p.Number)}
			}
			return fsError("complete-multipart", u, err)
		}
		files = append(files, f)
		hashes[i] = &partCheck{r: f, h: md5.New()}
		readers = append(readers, hashes[i])
	}
	tmp, _, _, err := s.writeTemp(ctx, path.Dir(key), io.MultiReader(readers...), -1)
	if err != nil {
		return fsError("complete-multipart", u, err)
	}
	for i, p := range sorted {
		if got := hex.EncodeToString(hashes[i].h.Sum(nil)); got != strings.Trim(p.ETag, `"`) {
			_ = s.root.Remove(tmp)
			return &Error{Op: "complete-multipart", URL: u, Err: fmt.Errorf("part %d: ETag %q does not match the uploaded part", p.Number, p.ETag)}
		}
	}
	if err := s.publish(tmp, key, up.Meta); err != nil {
		return fsError("complete-multipart", u, err)
	}
	_ = s.root.RemoveAll(uploadDir(uploadID))
	return nil
}

// partCheck hashes a part while it is copied.
type partCheck struct {
	r io.Reader
	h interface {
		io.Writer
		Sum([]byte) []byte
	}
}

func (c *partCheck) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.h.Write(p[:n])
	return n, err
}

// AbortMultipart removes the upload and its parts.
func (s *FileStore) AbortMultipart(ctx context.Context, key, uploadID string) error {
	u := s.URL(key)
	if err := checkKey(key); err != nil {
		return &Error{Op: "abort-multipart", URL: u, Err: err}
	}
	if _, err := s.openUpload(key, uploadID); err != nil {
		return fsError("abort-multipart", u, err)
	}
	if err := s.root.RemoveAll(uploadDir(uploadID)); err != nil {
		return fsError("abort-multipart", u, err)
	}
	return nil
}

// ReplaceMetadata rewrites key's metadata sidecar, if key exists and its
// ETag is still etag.
func (s *FileStore) ReplaceMetadata(ctx context.Context, key, etag string, meta map[string]string) error {
	info, err := s.Stat(ctx, key)
	if err != nil {
		return err
	}
	u := s.URL(key)
	if etag != "" && info.ETag != etag {
		return &Error{Op: "replace-metadata", URL: u, Err: ErrChanged}
	}
	if err := s.writeMeta(key, meta); err != nil {
		return fsError("replace-metadata", u, err)
	}
	return nil
}
