package e2e

import (
	"context"
	"encoding/json"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/snapfs/snapfs/tests/harness"
	"github.com/snapfs/snapfs/tests/images"
)

// s3Images are the corpus images uploaded to MinIO: backing chains and
// external data files (named relative to the key), compression, subclusters,
// snapshots, guest content from QEMU's samples, v2, and a refused one.
var s3Images = []string{
	"v3-64k", "v2-64k", "chain", "extl2-backed", "datafile", "datafile-raw",
	"zstd-64k", "zlib-v2-512", "snapshot", "from-vhdx", "zero", "luks",
}

// TestMinIO reads corpus images from a real MinIO: over s3:// (with the
// endpoint from the environment or from flags), over pre-signed http URLs
// (and checks that no signature ever shows in stderr, also when the URL is
// expired or tampered with), and over a public bucket's plain http URLs.
func TestMinIO(t *testing.T) {
	t.Parallel()
	dir, corpus, malformed := imageSet(t)
	m := harness.StartMinIO(t)
	const bucket, prefix = "snaps", "vm/2024/"
	m.MakeBucket(t, bucket)
	m.MakeBucket(t, "public")
	m.MakePublic(t, "public")
	var ims []images.Image
	for _, name := range s3Images {
		im := byName(t, corpus, name)
		ims = append(ims, im)
		for _, f := range im.Files {
			m.Upload(t, bucket, prefix+f, filepath.Join(dir, f))
			m.Upload(t, "public", f, filepath.Join(dir, f))
		}
	}
	// Images to refuse, and QEMU's non-QCOW2 samples as they are (those
	// under 40 MiB).
	var refused []images.Image
	for _, im := range malformed {
		size := int64(0)
		for _, f := range im.Files {
			fi, err := os.Stat(filepath.Join(dir, f))
			if err != nil {
				t.Fatal(err)
			}
			size += fi.Size()
		}
		if size > 40<<20 {
			continue
		}
		refused = append(refused, im)
		for _, f := range im.Files {
			m.Upload(t, bucket, prefix+f, filepath.Join(dir, f))
		}
	}
	env := m.Env()
	client := m.Client(t)

	// Refused over s3:// as over file://; backing names resolve against
	// the key's prefix ("../escape.qcow2" would leave it).
	t.Run("refused", func(t *testing.T) {
		for _, im := range refused {
			t.Run(im.Name, func(t *testing.T) {
				t.Parallel()
				u := "s3://" + bucket + "/" + prefix + im.Key
				res := runCLI(t, cliRun{args: []string{"info", "--json", u}, env: env, timeout: 30 * time.Second})
				if im.Stage == images.StageHeader {
					if res.code != 1 {
						t.Errorf("info exits %d, want 1:\n%s", res.code, res)
					}
					checkError(t, res, prefix+im.Key, im.Reason)
				} else if res.code != 0 {
					t.Errorf("info exits %d, want 0:\n%s", res.code, res)
				}
				res = runCLI(t, cliRun{args: []string{"cat", u}, env: env, timeout: 30 * time.Second})
				if res.code != 1 {
					t.Errorf("cat exits %d, want 1:\n%s", res.code, res)
				}
				checkError(t, res, prefix+im.Key, im.Reason)
				if res.maxRSS > memBound {
					t.Errorf("used %d MiB (bound %d MiB):\n%s", res.maxRSS>>20, memBound>>20, res)
				}
			})
		}
	})

	t.Run("s3", func(t *testing.T) {
		for _, im := range ims {
			t.Run(im.Name, func(t *testing.T) {
				t.Parallel()
				u := "s3://" + bucket + "/" + prefix + im.Key
				if im.Expect == images.Refuse {
					res := runCLI(t, cliRun{args: []string{"info", "--json", u}, env: env})
					var info map[string]any
					if res.code != 0 || json.Unmarshal(res.stdout, &info) != nil {
						t.Fatalf("info of a refused image:\n%s", res)
					}
					if info["servable"] != false || !strings.Contains(fmtAny(info["reason"]), im.Reason) {
						t.Errorf("info: servable %v, reason %v; want false, %q", info["servable"], info["reason"], im.Reason)
					}
					res = runCLI(t, cliRun{args: []string{"cat", u}, env: env})
					if res.code != 1 {
						t.Errorf("cat of a refused image exits %d:\n%s", res.code, res)
					}
					checkError(t, res, prefix+im.Key, im.Reason)
					return
				}
				ref := reference(t, dir, im.Key)
				sum, n, res := catSHA(t, cliRun{args: []string{"cat", u}, env: env})
				checkCat(t, res, sum, n, ref)

				res = runCLI(t, cliRun{args: []string{"info", u, "--json"}, env: env})
				if res.code != 0 {
					t.Fatalf("info:\n%s", res)
				}
				var info map[string]any
				if err := json.Unmarshal(res.stdout, &info); err != nil {
					t.Fatalf("info --json: %v", err)
				}
				compareInfo(t, "", info, ref.info)
				checkObjectFacts(t, client, bucket, prefix+im.Key, info)

				res = runCLI(t, cliRun{args: []string{"map", "--json", u}, env: env})
				if res.code != 0 {
					t.Fatalf("map:\n%s", res)
				}
				checkMap(t, im, res.stdout, ref)
			})
		}
	})

	// The endpoint and region as flags, before and after the command,
	// with only the credentials in the environment.
	t.Run("flags", func(t *testing.T) {
		t.Parallel()
		im := byName(t, corpus, "chain")
		ref := reference(t, dir, im.Key)
		var creds []string
		for _, kv := range env {
			if !strings.HasPrefix(kv, "AWS_ENDPOINT_URL=") && !strings.HasPrefix(kv, "AWS_REGION=") {
				creds = append(creds, kv)
			}
		}
		endpoint := "http://" + m.Endpoint
		u := "s3://" + bucket + "/" + prefix + im.Key
		for _, args := range [][]string{
			{"--endpoint", endpoint, "--region", harness.MinIORegion, "--path-style", "cat", u},
			{"cat", u, "--endpoint", endpoint, "--region", harness.MinIORegion, "--path-style", "--retries", "3"},
		} {
			sum, n, res := catSHA(t, cliRun{args: args, env: creds})
			checkCat(t, res, sum, n, ref)
		}
		// Without an endpoint, the CLI must not reach MinIO; with wrong
		// credentials it must fail with access denied, naming the object.
		bad := []string{"AWS_ENDPOINT_URL=" + endpoint, "AWS_ACCESS_KEY_ID=nobody", "AWS_SECRET_ACCESS_KEY=wrong-secret-0123456789", "AWS_REGION=" + harness.MinIORegion}
		res := runCLI(t, cliRun{args: []string{"--retries", "2", "cat", u}, env: bad})
		if res.code == 0 {
			t.Errorf("cat with wrong credentials succeeded")
		}
		if !strings.Contains(res.stderr, prefix+im.Key) || strings.Contains(res.stderr, "wrong-secret-0123456789") {
			t.Errorf("the error must name the object and never the secret:\n%s", res)
		}
		// A missing object.
		res = runCLI(t, cliRun{args: []string{"cat", "s3://" + bucket + "/" + prefix + "no-such.qcow2"}, env: env})
		if res.code != 1 || !strings.Contains(res.stderr, "not found") || !strings.Contains(res.stderr, "no-such.qcow2") {
			t.Errorf("cat of a missing object: want exit 1 and \"not found\" naming it:\n%s", res)
		}
	})

	// Pre-signed URLs of single-file images.
	t.Run("presigned", func(t *testing.T) {
		for _, name := range []string{"v3-64k", "zstd-64k", "from-vhdx"} {
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				im := byName(t, corpus, name)
				ref := reference(t, dir, im.Key)
				u := m.PresignGet(t, bucket, prefix+im.Key, time.Hour)
				sig := signature(t, u)
				sum, n, res := catSHA(t, cliRun{args: []string{"--log-level", "debug", "cat", u}})
				checkCat(t, res, sum, n, ref)
				noSecrets(t, res, m, sig)

				res = runCLI(t, cliRun{args: []string{"--log-level", "debug", "info", "--json", u}})
				noSecrets(t, res, m, sig)
				if res.code != 0 {
					t.Fatalf("info:\n%s", res)
				}
				var info map[string]any
				if err := json.Unmarshal(res.stdout, &info); err != nil {
					t.Fatalf("info --json: %v", err)
				}
				compareInfo(t, "", info, ref.info)
				checkObjectFacts(t, client, bucket, prefix+im.Key, info)
				if strings.Contains(string(res.stdout), sig) {
					t.Errorf("info --json shows the signature:\n%s", res.stdout)
				}
			})
		}
	})

	// Expired and tampered pre-signed URLs fail, naming the object, and
	// never show the signature.
	t.Run("presigned-bad", func(t *testing.T) {
		t.Parallel()
		key := prefix + "v3-64k.qcow2"
		expired := m.PresignGet(t, bucket, key, time.Second)
		tampered := m.PresignGet(t, bucket, key, time.Hour)
		sig := signature(t, tampered)
		bad := []byte(sig)
		if bad[5] == '0' { // another hex digit
			bad[5] = '1'
		} else {
			bad[5] = '0'
		}
		forged := strings.Replace(tampered, sig, string(bad), 1)
		time.Sleep(2 * time.Second) // let the first one expire
		for _, c := range []struct{ name, url, sig string }{
			{"expired", expired, signature(t, expired)},
			{"tampered", forged, string(bad)},
		} {
			for _, cmd := range [][]string{{"cat", c.url}, {"info", "--json", c.url}, {"--log-level", "debug", "map", "--json", c.url}} {
				res := runCLI(t, cliRun{args: append([]string{"--retries", "2"}, cmd...)})
				if res.code == 0 {
					t.Errorf("%s URL: %s succeeded", c.name, cmd[0])
				}
				if !strings.Contains(res.stderr, "v3-64k.qcow2") {
					t.Errorf("%s URL: the error does not name the object:\n%s", c.name, res)
				}
				noSecrets(t, res, m, c.sig)
				noSecrets(t, res, m, sig)
			}
		}
	})

	// A public bucket over plain http: the backing chain and the external
	// data file resolve relative to the URL.
	t.Run("public-http", func(t *testing.T) {
		for _, name := range []string{"chain", "datafile", "extl2-backed"} {
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				im := byName(t, corpus, name)
				ref := reference(t, dir, im.Key)
				sum, n, res := catSHA(t, cliRun{args: []string{"cat", m.URL("public", im.Key)}})
				checkCat(t, res, sum, n, ref)
			})
		}
	})
}

// checkObjectFacts checks info's object-size and etag against MinIO.
func checkObjectFacts(t *testing.T, c *minio.Client, bucket, key string, info map[string]any) {
	t.Helper()
	st, err := c.StatObject(context.Background(), bucket, key, minio.StatObjectOptions{})
	if err != nil {
		t.Fatalf("stat %s: %v", key, err)
	}
	if v, _ := info["object-size"].(float64); int64(v) != st.Size {
		t.Errorf("info: object-size %v, MinIO says %d", info["object-size"], st.Size)
	}
	if v, _ := info["etag"].(string); strings.Trim(v, `"`) != strings.Trim(st.ETag, `"`) {
		t.Errorf("info: etag %q, MinIO says %q", v, st.ETag)
	}
	if u, _ := info["url"].(string); !strings.Contains(u, key) || strings.Contains(u, "X-Amz-") {
		t.Errorf("info: url %q must name %s without a signature", u, key)
	}
}

// signature returns the X-Amz-Signature of a pre-signed URL.
func signature(t *testing.T, raw string) string {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	sig := u.Query().Get("X-Amz-Signature")
	if len(sig) < 32 {
		t.Fatalf("no signature in %s", raw)
	}
	return sig
}

// noSecrets fails if stderr shows a signature or the secret key.
func noSecrets(t *testing.T, res *result, m *harness.MinIO, sig string) {
	t.Helper()
	for _, s := range []string{sig, m.SecretKey, "X-Amz-Signature="} {
		if strings.Contains(res.stderr, s) {
			t.Errorf("stderr shows a secret (%.12s...):\n%s", s, res)
		}
	}
}

func fmtAny(v any) string {
	s, _ := v.(string)
	return s
}
