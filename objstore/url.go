package objstore

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// PathStyle selects how S3 requests name the bucket.
type PathStyle string

// PathStyle values.
const (
	PathStyleAuto PathStyle = "auto" // let the client choose (virtual-host on AWS, path elsewhere)
	PathStyleOn   PathStyle = "on"   // always http://endpoint/bucket/key
	PathStyleOff  PathStyle = "off"  // always http://bucket.endpoint/key
)

// ParsePathStyle parses "auto", "on" or "off" ("" means auto; "true" and
// "false" are accepted as on and off).
func ParsePathStyle(s string) (PathStyle, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "auto":
		return PathStyleAuto, nil
	case "on", "true", "path":
		return PathStyleOn, nil
	case "off", "false", "virtual", "virtual-host":
		return PathStyleOff, nil
	}
	return "", fmt.Errorf("invalid path style %q: want auto, on or off", s)
}

// DefaultEndpoint is the S3 endpoint used when neither Config.Endpoint nor
// the environment names one.
const DefaultEndpoint = "https://s3.amazonaws.com"

// DefaultRegion is the region reported by Config.ResolvedRegion when none is
// configured.
const DefaultRegion = "us-east-1"

// Config configures the stores Open creates. The zero value is usable.
type Config struct {
	// Endpoint is the S3 endpoint URL ("http://127.0.0.1:9000",
	// "https://s3.example.com"; a bare host:port means https). Empty means
	// $AWS_ENDPOINT_URL_S3, else $AWS_ENDPOINT_URL, else DefaultEndpoint.
	Endpoint string
	// Region is the S3 region. Empty means $AWS_REGION, else
	// $AWS_DEFAULT_REGION; when none is set the client discovers the
	// bucket's region (signing that lookup for us-east-1).
	Region string
	// PathStyle selects path-style or virtual-host-style bucket addressing;
	// "" means auto.
	PathStyle PathStyle
	// Insecure skips TLS certificate verification.
	Insecure bool
	// HTTPClient, when set, is used for http(s) URLs, and its Transport for
	// S3 (Insecure then does not apply). When nil a shared transport tuned
	// for many parallel ranged GETs is used.
	HTTPClient *http.Client

	// AccessKey, SecretKey and SessionToken, when AccessKey is set, are the
	// S3 credentials; otherwise the chain is used: AWS_ACCESS_KEY_ID /
	// AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE with the shared
	// credentials and config files, MINIO_ROOT_USER / MINIO_ROOT_PASSWORD,
	// then the instance or container role (IAM).
	AccessKey, SecretKey, SessionToken string
	// Anonymous sends unsigned S3 requests (public buckets).
	Anonymous bool
	// NoIAM leaves the instance-metadata (IAM) provider out of the
	// credentials chain. It is also left out when AWS_EC2_METADATA_DISABLED
	// is "true" and no container or web-identity credentials are configured.
	NoIAM bool
}

// ResolvedEndpoint returns the S3 endpoint URL the config stands for,
// applying the environment and the default.
func (c Config) ResolvedEndpoint() string {
	for _, v := range []string{c.Endpoint, os.Getenv("AWS_ENDPOINT_URL_S3"), os.Getenv("AWS_ENDPOINT_URL")} {
		if v = strings.TrimSpace(v); v != "" {
			return v
		}
	}
	return DefaultEndpoint
}

// explicitRegion returns the configured region, or "" when nothing names one.
func (c Config) explicitRegion() string {
	for _, v := range []string{c.Region, os.Getenv("AWS_REGION"), os.Getenv("AWS_DEFAULT_REGION")} {
		if v = strings.TrimSpace(v); v != "" {
			return v
		}
	}
	return ""
}

// ResolvedRegion returns the configured region, applying the environment
// and DefaultRegion.
func (c Config) ResolvedRegion() string {
	if r := c.explicitRegion(); r != "" {
		return r
	}
	return DefaultRegion
}

// httpClient returns the client for http(s) stores.
func (c Config) httpClient() *http.Client {
	if c.HTTPClient != nil {
		return c.HTTPClient
	}
	return &http.Client{Transport: sharedTransport(c.Insecure)}
}

// roundTripper returns the transport for S3 stores.
func (c Config) roundTripper() http.RoundTripper {
	if c.HTTPClient != nil {
		if c.HTTPClient.Transport != nil {
			return c.HTTPClient.Transport
		}
		return http.DefaultTransport
	}
	return sharedTransport(c.Insecure)
}

var (
	transportMu sync.Mutex
	transports  = map[bool]*http.Transport{}
)

// sharedTransport returns one process-wide transport per TLS-verification
// setting, so that every store reuses the same connection pool.
func sharedTransport(insecure bool) *http.Transport {
	transportMu.Lock()
	defer transportMu.Unlock()
	if t := transports[insecure]; t != nil {
		return t
	}
	t := NewTransport(insecure)
	transports[insecure] = t
	return t
}

// NewTransport returns an HTTP/1.1 transport tuned for many parallel ranged
// GETs against one host: a large idle pool per host, no transparent gzip
// (which would break byte ranges) and bounded dial, TLS and header waits.
// insecure skips TLS certificate verification.
func NewTransport(insecure bool) *http.Transport {
	return &http.Transport{
		Proxy: http.ProxyFromEnvironment,
		DialContext: (&net.Dialer{
			Timeout:   15 * time.Second,
			KeepAlive: 30 * time.Second,
		}).DialContext,
		MaxIdleConns:          512,
		MaxIdleConnsPerHost:   128,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ResponseHeaderTimeout: time.Minute,
		ExpectContinueTimeout: time.Second,
		DisableCompression:    true,
		TLSClientConfig: &tls.Config{
			MinVersion:         tls.VersionTLS12,
			InsecureSkipVerify: insecure,
		},
	}
}

// Open parses rawURL and returns the store that holds it and the object's
// key inside that store.
//
//   - s3://bucket/key: an S3 store for the bucket; key is the object key,
//     taken verbatim (empty, or ending in "/", for a prefix).
//   - https://... and http://...: a read-only store for the URL's directory;
//     key is the last path element. The URL's query string (a pre-signed
//     URL's signature) is used for that key only.
//   - file:///dir/name and plain paths: a directory store. An existing
//     directory is the root itself (key ""); anything else is rooted at its
//     parent directory, with the base name as key.
func Open(ctx context.Context, rawURL string, cfg Config) (Store, string, error) {
	if rawURL == "" {
		return nil, "", &Error{Op: "open", URL: "", Err: errors.New("empty URL")}
	}
	scheme := ""
	if i := strings.Index(rawURL, "://"); i > 0 {
		scheme = strings.ToLower(rawURL[:i])
	}
	switch scheme {
	case "s3":
		// Like the AWS CLI, take the key verbatim: no %-unescaping, and
		// "?" and "#" are part of it.
		rest := rawURL[len("s3://"):]
		bucket, key, _ := strings.Cut(rest, "/")
		if bucket == "" {
			return nil, "", &Error{Op: "open", URL: "s3://", Err: errors.New("s3 URL has no bucket")}
		}
		if strings.Contains(bucket, "@") {
			return nil, "", &Error{Op: "open", URL: "s3://", Err: errors.New("s3 URL must not carry credentials")}
		}
		st, err := NewS3(ctx, bucket, cfg)
		if err != nil {
			return nil, "", err
		}
		return st, key, nil
	case "http", "https":
		return newHTTPFromURL(rawURL, cfg)
	case "file":
		u, err := url.Parse(rawURL)
		if err != nil {
			return nil, "", &Error{Op: "open", URL: "file://", Err: errors.New("invalid file URL")}
		}
		if u.Host != "" && u.Host != "localhost" {
			return nil, "", &Error{Op: "open", URL: "file://" + u.Host, Err: ErrNotSupported}
		}
		if u.Path == "" {
			return nil, "", &Error{Op: "open", URL: "file://", Err: errors.New("file URL has no path")}
		}
		return openFilePath(u.Path)
	case "":
		return openFilePath(rawURL)
	default:
		return nil, "", &Error{Op: "open", URL: scheme + "://", Err: fmt.Errorf("unsupported scheme %q: %w", scheme, ErrNotSupported)}
	}
}

// openFilePath applies the directory-or-parent rule to a local path.
func openFilePath(p string) (Store, string, error) {
	abs, err := filepath.Abs(p)
	if err != nil {
		return nil, "", &Error{Op: "open", URL: fileURL(p, ""), Err: err}
	}
	// Resolve symbolic links so that an image that is a link to another
	// directory is still reachable from its store's root.
	if real, err := filepath.EvalSymlinks(abs); err == nil {
		abs = real
	}
	if fi, err := os.Stat(abs); err == nil && fi.IsDir() {
		st, err := NewFileStore(abs)
		return st, "", err
	}
	st, err := NewFileStore(filepath.Dir(abs))
	if err != nil {
		return nil, "", err
	}
	return st, filepath.Base(abs), nil
}
