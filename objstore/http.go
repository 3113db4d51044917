package objstore

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
)

// maxRangeDiscard is how far into a body a read may skip when a server
// answers a ranged GET with the whole object (HTTP 200).
const maxRangeDiscard = 1 << 20

// HTTPStore is a read-only Store over http(s) URLs, such as S3 pre-signed
// or public URLs. Its keys are paths relative to a base directory; the
// query string of the URL it was opened with (the signature of a
// pre-signed URL) is sent for that one key only and never shown.
//
// Everything is done with GET: a pre-signed URL is valid for GET only, so
// Stat asks for the first byte ("Range: bytes=0-0") instead of sending a
// HEAD. Put, Delete, List and multipart uploads return ErrNotSupported.
type HTTPStore struct {
	client  *http.Client
	base    *url.URL // the directory: scheme, userinfo, host, path ending in "/"
	origKey string   // key of the URL the store was opened with
	origURL string   // that URL, query string included: never displayed
}

var _ Store = (*HTTPStore)(nil)

// NewHTTP returns the store for rawURL's directory and rawURL's key in it
// (its last path element). client may be nil (a shared tuned transport).
func NewHTTP(rawURL string, client *http.Client) (*HTTPStore, string, error) {
	u, err := url.Parse(rawURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		// url.Parse's error repeats the URL, signature included.
		return nil, "", &Error{Op: "open", URL: redactRawURL(rawURL), Err: errors.New("invalid http(s) URL")}
	}
	u.Fragment, u.RawFragment = "", ""
	esc := u.EscapedPath()
	if esc == "" {
		esc = "/"
	}
	i := strings.LastIndex(esc, "/")
	dirEsc, keyEsc := esc[:i+1], esc[i+1:]
	key, err := url.PathUnescape(keyEsc)
	if err != nil {
		return nil, "", &Error{Op: "open", URL: redactRawURL(rawURL), Err: errors.New("invalid escape in URL path")}
	}
	dir, err := url.PathUnescape(dirEsc)
	if err != nil {
		return nil, "", &Error{Op: "open", URL: redactRawURL(rawURL), Err: errors.New("invalid escape in URL path")}
	}
	base := &url.URL{Scheme: u.Scheme, User: u.User, Host: u.Host, Path: dir, RawPath: dirEsc}
	if client == nil {
		client = &http.Client{Transport: sharedTransport(false)}
	}
	return &HTTPStore{client: client, base: base, origKey: key, origURL: u.String()}, key, nil
}

func newHTTPFromURL(rawURL string, cfg Config) (Store, string, error) {
	st, key, err := NewHTTP(rawURL, cfg.httpClient())
	if err != nil {
		return nil, "", err
	}
	return st, key, nil
}

// redactRawURL returns rawURL without query string, fragment or userinfo,
// for error messages about URLs that did not parse.
func redactRawURL(rawURL string) string {
	if i := strings.IndexAny(rawURL, "?#"); i >= 0 {
		rawURL = rawURL[:i]
	}
	if i := strings.Index(rawURL, "://"); i >= 0 {
		rest := rawURL[i+3:]
		host := rest
		if j := strings.Index(rest, "/"); j >= 0 {
			host = rest[:j]
		}
		if k := strings.LastIndex(host, "@"); k >= 0 {
			rawURL = rawURL[:i+3] + rest[k+1:]
		}
	}
	return rawURL
}

// keyURL returns the URL to request for key, with credentials and, for
// the original key, the original query string.
func (s *HTTPStore) keyURL(key string) string {
	if key == s.origKey {
		return s.origURL
	}
	ref := &url.URL{Path: key}
	return s.base.ResolveReference(ref).String()
}

// URL returns the object's URL without query string or userinfo.
func (s *HTTPStore) URL(key string) string {
	u := s.base.ResolveReference(&url.URL{Path: key})
	u.User = nil
	u.RawQuery = ""
	return u.String()
}

// get sends a GET for key with the extra headers.
func (s *HTTPStore) get(ctx context.Context, op, key string, hdr map[string]string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.keyURL(key), nil)
	if err != nil {
		return nil, newError(op, s.URL(key), 0, errors.New("cannot build request"))
	}
	// An explicit identity encoding keeps the transport from asking for
	// gzip, which would make byte ranges meaningless.
	req.Header.Set("Accept-Encoding", "identity")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		if cerr := ctx.Err(); cerr != nil && errors.Is(err, cerr) {
			return nil, newError(op, s.URL(key), 0, cerr)
		}
		return nil, newError(op, s.URL(key), 0, err)
	}
	return resp, nil
}

// s3ErrorBody is the part of an S3 XML error body worth showing. (The
// rest, e.g. SignatureProvided or StringToSign, may hold secrets.)
type s3ErrorBody struct {
	Code    string `xml:"Code"`
	Message string `xml:"Message"`
}

// failure turns a non-success response into an *Error and closes its body.
func (s *HTTPStore) failure(op, key string, resp *http.Response) *Error {
	defer resp.Body.Close()
	cause := statusError(resp.StatusCode)
	var body s3ErrorBody
	if b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10)); len(b) > 0 && xml.Unmarshal(b, &body) == nil && body.Code != "" {
		detail := body.Code
		if body.Message != "" {
			detail += ": " + body.Message
		}
		cause = fmt.Errorf("%w (%s)", cause, detail)
	}
	return newError(op, s.URL(key), resp.StatusCode, cause)
}

// Stat reads the object's first byte: the size comes from Content-Range
// (or Content-Length when the server ignores ranges), the ETag,
// Last-Modified and x-amz-meta-* headers from the response.
func (s *HTTPStore) Stat(ctx context.Context, key string) (ObjectInfo, error) {
	resp, err := s.get(ctx, "stat", key, map[string]string{"Range": "bytes=0-0"})
	if err != nil {
		return ObjectInfo{}, err
	}
	info := ObjectInfo{Key: key}
	switch resp.StatusCode {
	case http.StatusPartialContent:
		_, _, total, perr := parseContentRange(resp.Header.Get("Content-Range"))
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 2))
		resp.Body.Close()
		if perr != nil || total < 0 {
			return ObjectInfo{}, newError("stat", s.URL(key), resp.StatusCode, fmt.Errorf("no object size in Content-Range %q", resp.Header.Get("Content-Range")))
		}
		info.Size = total
	case http.StatusOK:
		// No range support: the size is the body's length. Do not read
		// the body; drain it only when it is tiny, for connection reuse.
		if resp.ContentLength >= 0 && resp.ContentLength <= 4096 {
			_, _ = io.Copy(io.Discard, resp.Body)
		}
		resp.Body.Close()
		if resp.ContentLength < 0 {
			return ObjectInfo{}, newError("stat", s.URL(key), resp.StatusCode, errors.New("server reported no object size"))
		}
		info.Size = resp.ContentLength
	case http.StatusRequestedRangeNotSatisfiable:
		// Byte 0 does not exist: the object is empty.
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		if _, _, total, perr := parseContentRange(resp.Header.Get("Content-Range")); perr == nil && total > 0 {
			return ObjectInfo{}, newError("stat", s.URL(key), resp.StatusCode, ErrRange)
		}
		info.Size = 0
	default:
		return ObjectInfo{}, s.failure("stat", key, resp)
	}
	info.ETag = unquoteETag(resp.Header.Get("ETag"))
	if lm := resp.Header.Get("Last-Modified"); lm != "" {
		if t, err := http.ParseTime(lm); err == nil {
			info.LastModified = t
		}
	}
	info.Metadata = amzMeta(resp.Header)
	return info, nil
}

// unquoteETag turns `"abc"` into abc and a weak `W/"abc"` into W/abc.
func unquoteETag(v string) string {
	v = strings.TrimSpace(v)
	weak := strings.HasPrefix(v, "W/")
	v = strings.Trim(strings.TrimPrefix(v, "W/"), `"`)
	if weak {
		return "W/" + v
	}
	return v
}

// amzMeta collects x-amz-meta-* headers, lower case, without the prefix.
func amzMeta(h http.Header) map[string]string {
	var meta map[string]string
	for k, v := range h {
		lk := strings.ToLower(k)
		if name, ok := strings.CutPrefix(lk, "x-amz-meta-"); ok && len(v) > 0 {
			if meta == nil {
				meta = map[string]string{}
			}
			meta[name] = v[0]
		}
	}
	return meta
}

// parseContentRange parses "bytes FIRST-LAST/TOTAL" and "bytes */TOTAL".
// first and last are -1 for the latter, total is -1 for "*".
func parseContentRange(v string) (first, last, total int64, err error) {
	bad := fmt.Errorf("malformed Content-Range %q", v)
	rest, ok := strings.CutPrefix(strings.TrimSpace(v), "bytes ")
	if !ok {
		return 0, 0, 0, bad
	}
	rng, tot, ok := strings.Cut(rest, "/")
	if !ok {
		return 0, 0, 0, bad
	}
	total = -1
	if tot != "*" {
		if total, err = strconv.ParseInt(tot, 10, 64); err != nil || total < 0 {
			return 0, 0, 0, bad
		}
	}
	if rng == "*" {
		return -1, -1, total, nil
	}
	a, b, ok := strings.Cut(rng, "-")
	if !ok {
		return 0, 0, 0, bad
	}
	if first, err = strconv.ParseInt(a, 10, 64); err != nil || first < 0 {
		return 0, 0, 0, bad
	}
	if last, err = strconv.ParseInt(b, 10, 64); err != nil || last < first {
		return 0, 0, 0, bad
	}
	if total >= 0 && last >= total {
		return 0, 0, 0, bad
	}
	return first, last, total, nil
}

// ReadAt sends one ranged GET (with If-Match when asked) and requires a
// 206 whose Content-Range starts at off. A 200 (range ignored) is
// accepted only for offsets up to 1 MiB, whose prefix is discarded.
func (s *HTTPStore) ReadAt(ctx context.Context, key string, p []byte, off int64, opts ReadOptions) (int, error) {
	if off < 0 {
		return 0, newError("read", s.URL(key), 0, fmt.Errorf("%w: negative offset %d", ErrRange, off))
	}
	if len(p) == 0 {
		return 0, nil
	}
	hdr := map[string]string{"Range": fmt.Sprintf("bytes=%d-%d", off, off+int64(len(p))-1)}
	if opts.IfMatch != "" && !strings.HasPrefix(opts.IfMatch, "W/") {
		// A weak ETag can never match If-Match; it is checked against the
		// response's ETag below instead.
		hdr["If-Match"] = `"` + opts.IfMatch + `"`
	}
	resp, err := s.get(ctx, "read", key, hdr)
	if err != nil {
		return 0, err
	}
	u := s.URL(key)
	switch resp.StatusCode {
	case http.StatusPartialContent, http.StatusOK:
	case http.StatusRequestedRangeNotSatisfiable:
		_, _, total, perr := parseContentRange(resp.Header.Get("Content-Range"))
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
		resp.Body.Close()
		if perr == nil && total >= 0 && off < total {
			return 0, newError("read", u, resp.StatusCode, ErrRange)
		}
		// The first requested byte is past the end of the object.
		return 0, io.EOF
	default:
		return 0, s.failure("read", key, resp)
	}
	defer resp.Body.Close()
	if opts.IfMatch != "" {
		if et := resp.Header.Get("ETag"); et != "" && unquoteETag(et) != opts.IfMatch {
			return 0, newError("read", u, http.StatusPreconditionFailed, ErrChanged)
		}
	}
	if resp.StatusCode == http.StatusOK {
		return s.readWhole(u, resp, p, off)
	}
	first, last, _, err := parseContentRange(resp.Header.Get("Content-Range"))
	if err != nil || first < 0 {
		return 0, newError("read", u, resp.StatusCode, fmt.Errorf("bad 206 response: %v", err))
	}
	if first != off {
		return 0, newError("read", u, resp.StatusCode, fmt.Errorf("server sent range starting at %d for a read at %d", first, off))
	}
	length := last - first + 1
	if length > int64(len(p)) {
		return 0, newError("read", u, resp.StatusCode, fmt.Errorf("server sent %d bytes for a %d-byte range", length, len(p)))
	}
	n, err := io.ReadFull(resp.Body, p[:length])
	if err != nil {
		return n, newError("read", u, 0, fmt.Errorf("body cut short after %d of %d bytes: %w", n, length, io.ErrUnexpectedEOF))
	}
	if length < int64(len(p)) {
		return n, io.EOF
	}
	return n, nil
}

// readWhole serves a read from a 200 response carrying the whole object.
func (s *HTTPStore) readWhole(u string, resp *http.Response, p []byte, off int64) (int, error) {
	if off > maxRangeDiscard {
		return 0, newError("read", u, resp.StatusCode, fmt.Errorf("%w: server ignores Range requests (HTTP 200 for a range at offset %d)", ErrNotSupported, off))
	}
	total := resp.ContentLength
	if total >= 0 && off >= total {
		return 0, io.EOF
	}
	if skipped, err := io.CopyN(io.Discard, resp.Body, off); err != nil {
		if total < 0 && err == io.EOF {
			return 0, io.EOF
		}
		return 0, newError("read", u, 0, fmt.Errorf("body cut short after %d bytes: %w", skipped, io.ErrUnexpectedEOF))
	}
	want := int64(len(p))
	if total >= 0 && total-off < want {
		want = total - off
	}
	n, err := io.ReadFull(resp.Body, p[:want])
	switch {
	case err != nil && total >= 0:
		return n, newError("read", u, 0, fmt.Errorf("body cut short after %d of %d bytes: %w", n, want, io.ErrUnexpectedEOF))
	case err != nil:
		return n, io.EOF // unknown length: the body's end is the object's end
	case want < int64(len(p)):
		return n, io.EOF
	}
	return n, nil
}

// List is not supported over plain http(s).
func (s *HTTPStore) List(ctx context.Context, prefix string) ([]ObjectInfo, error) {
	return nil, &Error{Op: "list", URL: s.URL(prefix), Err: ErrNotSupported}
}

// Put is not supported: the store is read-only.
func (s *HTTPStore) Put(ctx context.Context, key string, r io.Reader, size int64, meta map[string]string) error {
	return &Error{Op: "put", URL: s.URL(key), Err: ErrNotSupported}
}

// Delete is not supported: the store is read-only.
func (s *HTTPStore) Delete(ctx context.Context, key string) error {
	return &Error{Op: "delete", URL: s.URL(key), Err: ErrNotSupported}
}

// CreateMultipart is not supported: the store is read-only.
func (s *HTTPStore) CreateMultipart(ctx context.Context, key string, meta map[string]string) (string, error) {
	return "", &Error{Op: "create-multipart", URL: s.URL(key), Err: ErrNotSupported}
}

// UploadPart is not supported: the store is read-only.
func (s *HTTPStore) UploadPart(ctx context.Context, key, uploadID string, number int, r io.Reader, size int64) (Part, error) {
	return Part{}, &Error{Op: "upload-part", URL: s.URL(key), Err: ErrNotSupported}
}

// CompleteMultipart is not supported: the store is read-only.
func (s *HTTPStore) CompleteMultipart(ctx context.Context, key, uploadID string, parts []Part) error {
	return &Error{Op: "complete-multipart", URL: s.URL(key), Err: ErrNotSupported}
}

// AbortMultipart is not supported: the store is read-only.
func (s *HTTPStore) AbortMultipart(ctx context.Context, key, uploadID string) error {
	return &Error{Op: "abort-multipart", URL: s.URL(key), Err: ErrNotSupported}
}
