package nbd

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// testCert makes a self-signed certificate for 127.0.0.1 and localhost,
// and writes it as ca-cert.pem into a directory for libnbd's
// tls-certificates.
func testCert(t *testing.T) (tls.Certificate, *x509.CertPool, string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "snapfs nbd test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:              []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	dir := t.TempDir()
	p := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := os.WriteFile(filepath.Join(dir, "ca-cert.pem"), p, 0o644); err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: cert}, pool, dir
}

func TestTLS(t *testing.T) {
	t.Parallel()
	cert, pool, certDir := testCert(t)
	dev := roDevice(testSize, 41)
	want := dev.snapshot()
	s := newServer(t, dev)
	s.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}}
	s.TLSMode = TLSRequire
	addr := serve(t, s)
	clientTLS := &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"}

	// Before TLS every option but STARTTLS and ABORT is refused.
	c := newTestClient(t, rawConn(t, addr))
	if err := c.greet(false); err != nil {
		t.Fatal(err)
	}
	for _, opt := range []uint32{optList, optStructuredReply, optInfo, optGo, optListMetaContext, 77} {
		if typ, _, err := c.option(opt, nil); err != nil || typ != repErrTLSReqd {
			t.Errorf("option %d before TLS: %#x %v", opt, typ, err)
		}
	}
	c.sendOption(optExportName, []byte("disk"))
	expectClosed(t, c.conn, "EXPORT_NAME before TLS")

	// A client without fixed newstyle can never upgrade: dropped.
	c = newTestClient(t, rawConn(t, addr))
	c.br.Discard(18)
	c.conn.Write([]byte{0, 0, 0, 0})
	expectClosed(t, c.conn, "non-fixed newstyle client")

	// STARTTLS, then everything works, and options agreed before TLS
	// would not count.
	c = dialClient(t, addr, clientOpts{name: "disk", structured: true, meta: true, tls: clientTLS})
	if _, ok := c.conn.(*tls.Conn); !ok {
		t.Fatal("not TLS")
	}
	expectRead(t, c.read(0, testSize), want, 0)
	if r := c.do(cmdBlockStatus, 0, 0, 1<<20, nil); r.errno != 0 || len(r.extents) == 0 {
		t.Errorf("block status over TLS: %d", r.errno)
	}
	c.disconnect()

	// STARTTLS twice is invalid; a failed handshake closes.
	c = newTestClient(t, rawConn(t, addr))
	c.greet(false)
	if err := c.startTLS(clientTLS); err != nil {
		t.Fatal(err)
	}
	if typ, _, err := c.option(optStartTLS, nil); err != nil || typ != repErrInvalid {
		t.Errorf("second STARTTLS: %#x %v", typ, err)
	}
	c.option(optAbort, nil)
	c = newTestClient(t, rawConn(t, addr))
	c.greet(false)
	if typ, _, _ := c.option(optStartTLS, nil); typ != repAck {
		t.Fatalf("STARTTLS: %#x", typ)
	}
	c.conn.Write([]byte("this is not a TLS client hello, not at all, no\r\n"))
	expectClosed(t, c.conn, "bad TLS handshake")

	// libnbd: nbds:// with our CA works, plain nbd:// is refused.
	if _, err := os.Stat("/usr/bin/nbdinfo"); err == nil {
		uri := "nbds://" + addr + "/disk?tls-certificates=" + certDir
		out := run(t, "nbdinfo", "--json", uri)
		var info struct {
			TLS     bool `json:"TLS"`
			Exports []struct {
				Size int64 `json:"export-size"`
			} `json:"exports"`
		}
		if err := json.Unmarshal([]byte(out), &info); err != nil || !info.TLS || len(info.Exports) != 1 || info.Exports[0].Size != testSize {
			t.Errorf("nbdinfo over TLS: %v %s", err, out)
		}
		if out, err := tryRun(t, "nbdinfo", "nbd://"+addr+"/disk"); err == nil || !strings.Contains(strings.ToLower(out), "tls") {
			t.Errorf("nbdinfo without TLS: %v %s", err, out)
		}
		if _, err := os.Stat("/usr/bin/nbdcopy"); err == nil {
			dst := filepath.Join(t.TempDir(), "copy.raw")
			run(t, "nbdcopy", uri, dst)
			if got, _ := os.ReadFile(dst); string(got) != string(want) {
				t.Error("nbdcopy over TLS: content differs")
			}
		}
	}
}

func TestTLSAllow(t *testing.T) {
	t.Parallel()
	cert, pool, _ := testCert(t)
	dev := roDevice(1<<20, 42)
	want := dev.snapshot()
	s := newServer(t, dev)
	s.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}}
	s.TLSMode = TLSAllow
	addr := serve(t, s)

	// Plain clients are served.
	c := dialClient(t, addr, clientOpts{name: "disk", structured: true})
	expectRead(t, c.read(0, 1<<20), want, 0)
	c.disconnect()

	// Structured replies agreed before STARTTLS are forgotten after it.
	c = newTestClient(t, rawConn(t, addr))
	c.greet(true)
	if typ, _, _ := c.option(optStructuredReply, nil); typ != repAck {
		t.Fatal("STRUCTURED_REPLY refused")
	}
	if err := c.startTLS(&tls.Config{RootCAs: pool, ServerName: "localhost"}); err != nil {
		t.Fatal(err)
	}
	info, err := c.infoGo(optGo, "disk")
	if err != nil || info.typ != repAck {
		t.Fatalf("GO: %+v %v", info, err)
	}
	if info.flags&flagSendDF != 0 {
		t.Errorf("SEND_DF after TLS without structured replies: %#x", info.flags)
	}
	c.structured = false
	expectRead(t, c.read(1000, 5000), want[1000:6000], 1000) // simple reply
	c.disconnect()

	// TLS versions before 1.2 are refused.
	c = newTestClient(t, rawConn(t, addr))
	c.greet(false)
	err = c.startTLS(&tls.Config{RootCAs: pool, ServerName: "localhost", MaxVersion: tls.VersionTLS11, MinVersion: tls.VersionTLS10})
	if err == nil {
		t.Error("TLS 1.1 accepted")
	}
}

func TestTLSConfigErrors(t *testing.T) {
	t.Parallel()
	s := &Server{Exports: ExportList(), TLSMode: TLSRequire}
	l := listen(t)
	if err := s.Serve(l); err == nil || !strings.Contains(err.Error(), "TLSConfig") {
		t.Errorf("Serve with TLS required and no config: %v", err)
	}
	s = &Server{}
	if err := s.Serve(listen(t)); err == nil {
		t.Error("Serve without exports succeeded")
	}
}
