package objstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// S3Store is a Store over one S3 bucket (AWS or compatible, e.g. MinIO);
// keys are object keys. It is built on minio-go with the client's own
// retries turned off: wrap it with WithRetry.
type S3Store struct {
	core   *minio.Core
	bucket string
}

var _ Store = (*S3Store)(nil)

// NewS3 returns a store for bucket, configured by cfg (endpoint, region,
// path style, TLS, credentials; see Config).
func NewS3(ctx context.Context, bucket string, cfg Config) (*S3Store, error) {
	fail := func(err error) (*S3Store, error) {
		return nil, &Error{Op: "open", URL: "s3://" + bucket, Err: err}
	}
	if bucket == "" {
		return fail(errors.New("empty bucket name"))
	}
	endpoint := cfg.ResolvedEndpoint()
	secure := true
	host := endpoint
	if strings.Contains(endpoint, "://") {
		u, err := url.Parse(endpoint)
		if err != nil || u.Host == "" {
			return fail(fmt.Errorf("invalid S3 endpoint %q", redactRawURL(endpoint)))
		}
		switch u.Scheme {
		case "http":
			secure = false
		case "https":
		default:
			return fail(fmt.Errorf("invalid S3 endpoint scheme %q", u.Scheme))
		}
		if u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
			return fail(fmt.Errorf("S3 endpoint %q must be scheme://host[:port] only", redactRawURL(endpoint)))
		}
		host = u.Host
	}
	lookup := minio.BucketLookupAuto
	switch cfg.PathStyle {
	case "", PathStyleAuto:
	case PathStyleOn:
		lookup = minio.BucketLookupPath
	case PathStyleOff:
		lookup = minio.BucketLookupDNS
	default:
		return fail(fmt.Errorf("invalid path style %q", cfg.PathStyle))
	}
	core, err := minio.NewCore(host, &minio.Options{
		Creds:        s3Credentials(cfg),
		Secure:       secure,
		Transport:    cfg.roundTripper(),
		Region:       cfg.explicitRegion(),
		BucketLookup: lookup,
		MaxRetries:   1, // retries belong to WithRetry, which resumes short reads
	})
	if err != nil {
		return fail(err)
	}
	return &S3Store{core: core, bucket: bucket}, nil
}

// s3Credentials builds the credentials cfg asks for (see Config.AccessKey).
func s3Credentials(cfg Config) *credentials.Credentials {
	switch {
	case cfg.Anonymous:
		return credentials.New(&credentials.Static{Value: credentials.Value{SignerType: credentials.SignatureAnonymous}})
	case cfg.AccessKey != "":
		return credentials.NewStaticV4(cfg.AccessKey, cfg.SecretKey, cfg.SessionToken)
	}
	providers := []credentials.Provider{
		&credentials.EnvAWS{},
		&credentials.FileAWSCredentials{}, // AWS_PROFILE (or "default") from the shared files
		&credentials.EnvMinio{},
	}
	if useIAM(cfg) {
		providers = append(providers, &credentials.IAM{})
	}
	return credentials.NewChainCredentials(providers)
}

// useIAM reports whether the instance/container role provider belongs in
// the chain.
func useIAM(cfg Config) bool {
	if cfg.NoIAM {
		return false
	}
	if strings.EqualFold(os.Getenv("AWS_EC2_METADATA_DISABLED"), "true") {
		// Container and web-identity credentials do not use the instance
		// metadata service.
		for _, v := range []string{"AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"} {
			if os.Getenv(v) != "" {
				return true
			}
		}
		return false
	}
	return true
}

// Bucket returns the store's bucket name.
func (s *S3Store) Bucket() string { return s.bucket }

// URL returns s3://bucket/key.
func (s *S3Store) URL(key string) string { return "s3://" + s.bucket + "/" + key }

// s3Error maps a minio-go error to an *Error with the store's sentinels.
func (s *S3Store) s3Error(op, key string, err error) *Error {
	u := s.URL(key)
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return newError(op, u, 0, err)
	}
	resp := minio.ToErrorResponse(err)
	if resp.StatusCode == 0 && resp.Code == "" {
		return newError(op, u, 0, err)
	}
	var cause error
	switch {
	case resp.StatusCode == http.StatusNotFound || resp.Code == "NoSuchKey" || resp.Code == "NoSuchBucket" || resp.Code == "NoSuchUpload":
		cause = ErrNotFound
	case resp.StatusCode == http.StatusPreconditionFailed || resp.Code == "PreconditionFailed":
		cause = ErrChanged
	case resp.StatusCode == http.StatusForbidden || resp.Code == "AccessDenied":
		cause = ErrForbidden
	case resp.StatusCode == http.StatusRequestedRangeNotSatisfiable || resp.Code == "InvalidRange":
		cause = ErrRange
	case resp.StatusCode == http.StatusNotImplemented || resp.Code == "NotImplemented":
		cause = ErrNotSupported
	default:
		cause = statusError(resp.StatusCode)
	}
	detail := resp.Code
	if resp.Message != "" {
		detail += ": " + resp.Message
	}
	if detail != "" {
		cause = fmt.Errorf("%w (%s)", cause, detail)
	}
	switch resp.Code {
	case "RequestTimeout", "SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeTooSkewed":
		cause = transientError{cause}
	}
	return newError(op, u, resp.StatusCode, cause)
}

// Stat is a HEAD (StatObject).
func (s *S3Store) Stat(ctx context.Context, key string) (ObjectInfo, error) {
	oi, err := s.core.StatObject(ctx, s.bucket, key, minio.StatObjectOptions{})
	if err != nil {
		return ObjectInfo{}, s.s3Error("stat", key, err)
	}
	return s3Info(key, oi), nil
}

func s3Info(key string, oi minio.ObjectInfo) ObjectInfo {
	info := ObjectInfo{Key: key, Size: oi.Size, ETag: strings.Trim(oi.ETag, `"`), LastModified: oi.LastModified}
	for k, v := range oi.UserMetadata {
		if info.Metadata == nil {
			info.Metadata = map[string]string{}
		}
		k = strings.ToLower(k)
		k = strings.TrimPrefix(k, "x-amz-meta-")
		info.Metadata[k] = v
	}
	return info
}

// ReadAt is one GetObject with a Range (and If-Match when asked), read
// fully into p. A range starting past the end gives 0, io.EOF; one running
// past it gives the bytes up to the end and io.EOF.
func (s *S3Store) ReadAt(ctx context.Context, key string, p []byte, off int64, opts ReadOptions) (int, error) {
	if off < 0 {
		return 0, newError("read", s.URL(key), 0, fmt.Errorf("%w: negative offset %d", ErrRange, off))
	}
	if len(p) == 0 {
		return 0, nil
	}
	var gopts minio.GetObjectOptions
	if err := gopts.SetRange(off, off+int64(len(p))-1); err != nil {
		return 0, newError("read", s.URL(key), 0, err)
	}
	if opts.IfMatch != "" {
		if err := gopts.SetMatchETag(opts.IfMatch); err != nil {
			return 0, newError("read", s.URL(key), 0, err)
		}
	}
	body, oi, hdr, err := s.core.GetObject(ctx, s.bucket, key, gopts)
	if err != nil {
		e := s.s3Error("read", key, err)
		if errors.Is(e, ErrRange) {
			// 416: the range starts at or past the end, unless the object
			// is larger than off (which S3 never answers with 416).
			if info, serr := s.Stat(ctx, key); serr == nil && off >= info.Size {
				return 0, io.EOF
			}
		}
		return 0, e
	}
	defer body.Close()
	u := s.URL(key)
	want := int64(len(p))
	if cr := hdr.Get("Content-Range"); cr != "" {
		first, last, _, perr := parseContentRange(cr)
		if perr != nil || first != off {
			return 0, newError("read", u, http.StatusPartialContent, fmt.Errorf("response range %q does not start at %d", cr, off))
		}
		if l := last - first + 1; l < want {
			want = l
		}
	} else if off != 0 {
		return 0, newError("read", u, http.StatusOK, errors.New("server ignored the Range header"))
	} else if oi.Size >= 0 && oi.Size < want {
		want = oi.Size // a whole (small) object in a 200
	}
	n, err := io.ReadFull(body, p[:want])
	if err != nil {
		if cerr := ctx.Err(); cerr != nil {
			return n, newError("read", u, 0, cerr)
		}
		return n, newError("read", u, 0, fmt.Errorf("body cut short after %d of %d bytes: %w", n, want, io.ErrUnexpectedEOF))
	}
	if want < int64(len(p)) {
		return n, io.EOF
	}
	return n, nil
}

// List lists every key under prefix (recursive), in key order.
func (s *S3Store) List(ctx context.Context, prefix string) ([]ObjectInfo, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var out []ObjectInfo
	for oi := range s.core.Client.ListObjects(ctx, s.bucket, minio.ListObjectsOptions{Prefix: prefix, Recursive: true}) {
		if oi.Err != nil {
			return nil, s.s3Error("list", prefix, oi.Err)
		}
		out = append(out, s3Info(oi.Key, oi))
	}
	slices.SortFunc(out, func(a, b ObjectInfo) int { return strings.Compare(a.Key, b.Key) })
	return out, nil
}

// Put uploads size bytes from r with PutObject; size must be known.
func (s *S3Store) Put(ctx context.Context, key string, r io.Reader, size int64, meta map[string]string) error {
	if size < 0 {
		return newError("put", s.URL(key), 0, errors.New("size must be known; use a multipart upload"))
	}
	_, err := s.core.Client.PutObject(ctx, s.bucket, key, r, size, minio.PutObjectOptions{
		UserMetadata: meta,
		ContentType:  "application/octet-stream",
	})
	if err != nil {
		return s.s3Error("put", key, err)
	}
	return nil
}

// Delete removes key; S3 does not report missing keys.
func (s *S3Store) Delete(ctx context.Context, key string) error {
	if err := s.core.RemoveObject(ctx, s.bucket, key, minio.RemoveObjectOptions{}); err != nil {
		e := s.s3Error("delete", key, err)
		if errors.Is(e, ErrNotFound) && minio.ToErrorResponse(err).Code == "NoSuchKey" {
			return nil
		}
		return e
	}
	return nil
}

// CreateMultipart starts a multipart upload (CreateMultipartUpload).
func (s *S3Store) CreateMultipart(ctx context.Context, key string, meta map[string]string) (string, error) {
	id, err := s.core.NewMultipartUpload(ctx, s.bucket, key, minio.PutObjectOptions{
		UserMetadata: meta,
		ContentType:  "application/octet-stream",
	})
	if err != nil {
		return "", s.s3Error("create-multipart", key, err)
	}
	return id, nil
}

// UploadPart uploads one part (UploadPart). S3 wants every part but the
// last to be at least 5 MiB.
func (s *S3Store) UploadPart(ctx context.Context, key, uploadID string, number int, r io.Reader, size int64) (Part, error) {
	op, err := s.core.PutObjectPart(ctx, s.bucket, key, uploadID, number, r, size, minio.PutObjectPartOptions{})
	if err != nil {
		return Part{}, s.s3Error("upload-part", key, err)
	}
	return Part{Number: op.PartNumber, ETag: strings.Trim(op.ETag, `"`), Size: op.Size}, nil
}

// CompleteMultipart assembles the parts in number order.
func (s *S3Store) CompleteMultipart(ctx context.Context, key, uploadID string, parts []Part) error {
	if len(parts) == 0 {
		return newError("complete-multipart", s.URL(key), 0, errors.New("no parts"))
	}
	cps := make([]minio.CompletePart, len(parts))
	for i, p := range parts {
		cps[i] = minio.CompletePart{PartNumber: p.Number, ETag: p.ETag}
	}
	slices.SortFunc(cps, func(a, b minio.CompletePart) int { return a.PartNumber - b.PartNumber })
	if _, err := s.core.CompleteMultipartUpload(ctx, s.bucket, key, uploadID, cps, minio.PutObjectOptions{}); err != nil {
		return s.s3Error("complete-multipart", key, err)
	}
	return nil
}

// AbortMultipart discards the upload and its parts.
func (s *S3Store) AbortMultipart(ctx context.Context, key, uploadID string) error {
	if err := s.core.AbortMultipartUpload(ctx, s.bucket, key, uploadID); err != nil {
		return s.s3Error("abort-multipart", key, err)
	}
	return nil
}

// copyPartSize is the part size of the multipart copy ReplaceMetadata
// uses for objects larger than it: a single CopyObject of a large object
// answers only when the whole copy is done, past the transport's
// response-header timeout.
var copyPartSize int64 = 256 << 20

// ReplaceMetadata copies key onto itself with meta, if its ETag is still
// etag: one CopyObject up to copyPartSize, a multipart copy of
// copyPartSize parts beyond (aborted if it fails).
func (s *S3Store) ReplaceMetadata(ctx context.Context, key, etag string, meta map[string]string) error {
	info, err := s.Stat(ctx, key)
	if err != nil {
		return err
	}
	if etag != "" && info.ETag != etag {
		return newError("replace-metadata", s.URL(key), 0, ErrChanged)
	}
	src := minio.CopySrcOptions{Bucket: s.bucket, Object: key, MatchETag: info.ETag}
	dst := minio.CopyDestOptions{Bucket: s.bucket, Object: key, UserMetadata: meta, ReplaceMetadata: true}
	if info.Size > copyPartSize {
		src.MatchRange, src.Start, src.End = true, 0, info.Size-1
		dst.PartSize = uint64(copyPartSize)
	}
	if _, err := s.core.Client.ComposeObject(ctx, dst, src); err != nil {
		return s.s3Error("replace-metadata", key, err)
	}
	return nil
}
