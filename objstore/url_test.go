package objstore_test

import (
	"context"
	"errors"
	"testing"

	"github.com/snapfs/snapfs/objstore"
)

func TestOpenS3URLs(t *testing.T) {
	ctx := context.Background()
	cfg := objstore.Config{Endpoint: "http://127.0.0.1:9", AccessKey: "a", SecretKey: "b", NoIAM: true}
	for raw, want := range map[string]string{
		"s3://bkt":                "",
		"s3://bkt/":               "",
		"s3://bkt/dir/":           "dir/",
		"s3://bkt/dir/disk.qcow2": "dir/disk.qcow2",
		"s3://bkt/a b%20c#d?e":    "a b%20c#d?e", // verbatim, like the AWS CLI
	} {
		st, key, err := objstore.Open(ctx, raw, cfg)
		if err != nil {
			t.Fatalf("Open(%q): %v", raw, err)
		}
		if key != want {
			t.Errorf("Open(%q) key = %q, want %q", raw, key, want)
		}
		if got := st.URL(key); got != "s3://bkt/"+want {
			t.Errorf("URL = %q", got)
		}
	}
	for _, raw := range []string{"s3://", "s3:///key", "s3://user:pw@bkt/key"} {
		if _, _, err := objstore.Open(ctx, raw, cfg); err == nil {
			t.Errorf("Open(%q) accepted", raw)
		}
	}
	bad := cfg
	bad.Endpoint = "http://127.0.0.1:9/some/path"
	if _, _, err := objstore.Open(ctx, "s3://bkt/k", bad); err == nil {
		t.Error("endpoint with a path accepted")
	}
	bad.Endpoint, bad.PathStyle = "", "sideways"
	if _, _, err := objstore.Open(ctx, "s3://bkt/k", bad); err == nil {
		t.Error("bad path style accepted")
	}
}

func TestConfigFromEnvironment(t *testing.T) {
	t.Setenv("AWS_ENDPOINT_URL_S3", "")
	t.Setenv("AWS_ENDPOINT_URL", "")
	t.Setenv("AWS_REGION", "")
	t.Setenv("AWS_DEFAULT_REGION", "")
	var c objstore.Config
	if c.ResolvedEndpoint() != objstore.DefaultEndpoint || c.ResolvedRegion() != "us-east-1" {
		t.Fatalf("defaults: %q %q", c.ResolvedEndpoint(), c.ResolvedRegion())
	}
	t.Setenv("AWS_ENDPOINT_URL", "http://minio:9000")
	t.Setenv("AWS_DEFAULT_REGION", "eu-west-1")
	if c.ResolvedEndpoint() != "http://minio:9000" || c.ResolvedRegion() != "eu-west-1" {
		t.Fatalf("env: %q %q", c.ResolvedEndpoint(), c.ResolvedRegion())
	}
	t.Setenv("AWS_REGION", "eu-central-1")
	c.Endpoint = "https://flag.example"
	if c.ResolvedEndpoint() != "https://flag.example" || c.ResolvedRegion() != "eu-central-1" {
		t.Fatalf("flag over env: %q %q", c.ResolvedEndpoint(), c.ResolvedRegion())
	}
}

func TestParsePathStyle(t *testing.T) {
	for in, want := range map[string]objstore.PathStyle{"": objstore.PathStyleAuto, "auto": objstore.PathStyleAuto, "on": objstore.PathStyleOn, "OFF": objstore.PathStyleOff, "true": objstore.PathStyleOn} {
		if got, err := objstore.ParsePathStyle(in); err != nil || got != want {
			t.Errorf("ParsePathStyle(%q) = %q, %v", in, got, err)
		}
	}
	if _, err := objstore.ParsePathStyle("maybe"); err == nil {
		t.Error("ParsePathStyle(maybe) accepted")
	}
	var e *objstore.Error
	_, _, err := objstore.Open(context.Background(), "gopher://x/y", objstore.Config{})
	if !errors.As(err, &e) || !errors.Is(err, objstore.ErrNotSupported) {
		t.Errorf("unknown scheme: %v", err)
	}
}
