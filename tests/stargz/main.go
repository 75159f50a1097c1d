// Command stargz-snapshotter is the test harness's stargz snapshotter: the
// snapshotter and FUSE filesystem of github.com/containerd/stargz-snapshotter
// (Debian's sources, built offline by scripts/build-stargz.sh) served to a
// containerd as a proxy snapshotter over a unix socket, plus `verify`, which
// checks an eStargz blob against its TOC digest.
//
//	stargz-snapshotter serve --root DIR --address SOCK [--ca FILE] [--registry HOST --user USER:PASSWORD]
//	                         [--no-background-fetch] [--no-prefetch] [--fetch-stats FILE] [--log-level LEVEL]
//	stargz-snapshotter verify --blob FILE [--toc-digest DIGEST] [--diff-id DIGEST]
package main

import (
	"compress/gzip"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/contrib/snapshotservice"
	"github.com/containerd/containerd/log"
	"github.com/containerd/containerd/reference"
	"github.com/containerd/containerd/remotes/docker"
	"github.com/containerd/stargz-snapshotter/estargz"
	stargzfs "github.com/containerd/stargz-snapshotter/fs"
	"github.com/containerd/stargz-snapshotter/fs/config"
	"github.com/containerd/stargz-snapshotter/fs/source"
	"github.com/containerd/stargz-snapshotter/snapshot"
	digest "github.com/opencontainers/go-digest"
	"github.com/sirupsen/logrus"
	"google.golang.org/grpc"
)

func main() {
	if len(os.Args) < 2 {
		fail(fmt.Errorf("usage: %s serve|verify [flags]", os.Args[0]))
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "verify":
		err = verify(os.Args[2:])
	default:
		err = fmt.Errorf("unknown subcommand %q (serve or verify)", os.Args[1])
	}
	if err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "stargz-snapshotter:", err)
	os.Exit(1)
}

func serve(args []string) error {
	fl := flag.NewFlagSet("serve", flag.ExitOnError)
	root := fl.String("root", "", "state directory (snapshots, FUSE mounts, fetched-content cache)")
	address := fl.String("address", "", "unix socket to serve the snapshots gRPC API on")
	caFile := fl.String("ca", "", "PEM CA file trusted for registries, besides the system's roots")
	registry := fl.String("registry", "", "host[:port] of the registry the credentials are for")
	user := fl.String("user", "", "USER:PASSWORD for --registry")
	noBackground := fl.Bool("no-background-fetch", false, "fetch only what is read (no background download of whole layers)")
	noPrefetch := fl.Bool("no-prefetch", false, "no prefetch at mount, even of an image's prioritized files")
	stats := fl.String("fetch-stats", "", "JSON file kept up to date with the bytes of each blob received from registries")
	level := fl.String("log-level", "info", "logrus level")
	_ = fl.Parse(args)
	if *root == "" || *address == "" {
		return fmt.Errorf("serve needs --root and --address")
	}
	lvl, err := logrus.ParseLevel(*level)
	if err != nil {
		return err
	}
	logrus.SetLevel(lvl)
	hosts, err := registryHosts(*caFile, *registry, *user, *stats)
	if err != nil {
		return err
	}
	ctx := context.Background()
	cfg := config.Config{NoBackgroundFetch: *noBackground, NoPrefetch: *noPrefetch, NoPrometheus: true}
	fs, err := stargzfs.NewFilesystem(filepath.Join(*root, "stargz"), cfg,
		stargzfs.WithGetSources(source.FromDefaultLabels(hosts)))
	if err != nil {
		return fmt.Errorf("the stargz filesystem: %w", err)
	}
	sn, err := snapshot.NewSnapshotter(ctx, filepath.Join(*root, "snapshotter"), fs, snapshot.AsynchronousRemove)
	if err != nil {
		return fmt.Errorf("the snapshotter: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(*address), 0o700); err != nil {
		return err
	}
	_ = os.Remove(*address)
	l, err := net.Listen("unix", *address)
	if err != nil {
		return err
	}
	rpc := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(rpc, snapshotservice.FromSnapshotter(sn))
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-stop
		rpc.Stop()
	}()
	log.G(ctx).WithField("address", *address).Info("serving the stargz snapshotter")
	err = rpc.Serve(l)
	// unmounts every FUSE mount of the snapshotter
	if cerr := sn.Close(); cerr != nil {
		log.G(ctx).WithError(cerr).Warn("closing the snapshotter")
	}
	return err
}

// registryHosts: HTTPS hosts through one client with a real Transport
// (fs/remote panics on http.DefaultClient's nil Transport) trusting caFile,
// Basic or Bearer credentials for `registry` only.
func registryHosts(caFile, registry, user, stats string) (source.RegistryHosts, error) {
	pool, err := x509.SystemCertPool()
	if err != nil || pool == nil {
		pool = x509.NewCertPool()
	}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, err
		}
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("no certificate in %s", caFile)
		}
	}
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	client := &http.Client{Transport: transport}
	if stats != "" {
		client.Transport = &counting{base: transport, file: stats, bytes: map[string]int64{}}
	}
	name, password, _ := strings.Cut(user, ":")
	creds := func(host string) (string, string, error) {
		if host == registry {
			return name, password, nil
		}
		return "", "", nil
	}
	return func(ref reference.Spec) ([]docker.RegistryHost, error) {
		return []docker.RegistryHost{{
			Client:       client,
			Authorizer:   docker.NewDockerAuthorizer(docker.WithAuthClient(client), docker.WithAuthCreds(creds)),
			Host:         ref.Hostname(),
			Scheme:       "https",
			Path:         "/v2",
			Capabilities: docker.HostCapabilityPull | docker.HostCapabilityResolve,
		}}, nil
	}, nil
}

// counting counts the body bytes of blob GETs per digest and writes them,
// as a JSON object, to `file` (on EOF, on close, and every MiB).
type counting struct {
	base    http.RoundTripper
	file    string
	mu      sync.Mutex
	bytes   map[string]int64
	pending int64
}

func (c *counting) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := c.base.RoundTrip(req)
	i := strings.LastIndex(req.URL.Path, "/blobs/")
	if err != nil || req.Method != http.MethodGet || i < 0 {
		return resp, err
	}
	resp.Body = &countedBody{ReadCloser: resp.Body, c: c, digest: req.URL.Path[i+len("/blobs/"):]}
	return resp, nil
}

func (c *counting) add(digest string, n int64, flush bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.bytes[digest] += n
	c.pending += n
	if !flush && c.pending < 1<<20 {
		return
	}
	c.pending = 0
	data, err := json.Marshal(c.bytes)
	if err == nil {
		err = os.WriteFile(c.file+".tmp", data, 0o644)
	}
	if err == nil {
		err = os.Rename(c.file+".tmp", c.file)
	}
	if err != nil {
		logrus.WithError(err).Warn("writing the fetch stats")
	}
}

type countedBody struct {
	io.ReadCloser
	c      *counting
	digest string
}

func (b *countedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	b.c.add(b.digest, int64(n), err != nil)
	return n, err
}

func (b *countedBody) Close() error {
	b.c.add(b.digest, 0, true)
	return b.ReadCloser.Close()
}

// What `verify` prints (one JSON object) when the blob passes.
type report struct {
	TOCDigest    string `json:"toc_digest"`
	DiffID       string `json:"diff_id"`
	Entries      int    `json:"entries"`
	Files        int    `json:"files"`
	Chunks       int    `json:"chunks"`
	PayloadBytes int64  `json:"payload_bytes"`
}

// verify opens an eStargz blob, checks its TOC against --toc-digest (when
// given) and every chunk of every regular file against the TOC's chunk
// digests, and computes the diff ID (sha256 of the whole decompressed blob).
func verify(args []string) error {
	fl := flag.NewFlagSet("verify", flag.ExitOnError)
	blob := fl.String("blob", "", "eStargz blob (the layer as stored in a registry)")
	wantTOC := fl.String("toc-digest", "", "expected TOC digest (annotation containerd.io/snapshot/stargz/toc.digest)")
	wantDiffID := fl.String("diff-id", "", "expected diff ID (the config's rootfs.diff_ids entry)")
	_ = fl.Parse(args)
	f, err := os.Open(*blob)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	r, err := estargz.Open(io.NewSectionReader(f, 0, st.Size()))
	if err != nil {
		return fmt.Errorf("not an eStargz blob: %w", err)
	}
	var v estargz.TOCEntryVerifier
	if *wantTOC != "" {
		want, err := digest.Parse(*wantTOC)
		if err != nil {
			return err
		}
		v, err = r.VerifyTOC(want)
		if err != nil {
			return err
		}
	} else if v, err = r.Verifiers(); err != nil {
		return err
	}
	rep := report{TOCDigest: r.TOCDigest().String()}
	root, ok := r.Lookup("")
	if !ok {
		return fmt.Errorf("the TOC has no root directory")
	}
	if err := walk(r, v, root, "", map[*estargz.TOCEntry]bool{}, &rep); err != nil {
		return err
	}
	gz, err := gzip.NewReader(io.NewSectionReader(f, 0, st.Size()))
	if err != nil {
		return err
	}
	h := sha256.New()
	if _, err := io.Copy(h, gz); err != nil {
		return fmt.Errorf("decompressing: %w", err)
	}
	rep.DiffID = digest.NewDigest(digest.SHA256, h).String()
	if *wantDiffID != "" && rep.DiffID != *wantDiffID {
		return fmt.Errorf("diff ID %s, want %s", rep.DiffID, *wantDiffID)
	}
	return json.NewEncoder(os.Stdout).Encode(rep)
}

// walk checks every regular file under dir once. A hard link's child is the
// entry it links to (the reader resolves it), whose chunks are filed under
// that entry's own name: a link's path finds only the first chunk
// (ChunkEntryForOffset), so files are read by e.Name, each once however many
// names it has.
func walk(r *estargz.Reader, v estargz.TOCEntryVerifier, dir *estargz.TOCEntry, path string, seen map[*estargz.TOCEntry]bool, rep *report) (err error) {
	dir.ForeachChild(func(name string, e *estargz.TOCEntry) bool {
		rep.Entries++
		p := name
		if path != "" {
			p = path + "/" + name
		}
		switch {
		case e.Type == "dir":
			err = walk(r, v, e, p, seen, rep)
		case e.Type == "reg" && seen[e]:
		case e.Type == "reg" && e.Size > 0:
			seen[e] = true
			err = verifyFile(r, v, e.Name, e.Size, rep)
		case e.Type == "reg":
			seen[e] = true
			rep.Files++
		}
		return err == nil
	})
	return err
}

// verifyFile reads a file chunk by chunk, each through its TOC chunk digest.
func verifyFile(r *estargz.Reader, v estargz.TOCEntryVerifier, name string, size int64, rep *report) error {
	sr, err := r.OpenFile(name)
	if err != nil {
		return err
	}
	rep.Files++
	for off := int64(0); off < size; {
		ce, ok := r.ChunkEntryForOffset(name, off)
		if !ok || ce.ChunkSize <= 0 {
			return fmt.Errorf("%s: no chunk at offset %d", name, off)
		}
		dv, err := v.Verifier(ce)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		// one ReadAt per chunk: the reader decompresses a chunk's gzip member
		// from its start at each call, so io.Copy's 32 KiB reads cost
		// O(chunk²) (minutes for a 64 MiB file)
		buf := make([]byte, ce.ChunkSize)
		if _, err := sr.ReadAt(buf, ce.ChunkOffset); err != nil && err != io.EOF {
			return fmt.Errorf("%s at %d: %w", name, ce.ChunkOffset, err)
		}
		if _, err := dv.Write(buf); err != nil {
			return fmt.Errorf("%s at %d: %w", name, ce.ChunkOffset, err)
		}
		if !dv.Verified() {
			return fmt.Errorf("%s: chunk at %d does not match its digest in the TOC", name, ce.ChunkOffset)
		}
		rep.Chunks++
		rep.PayloadBytes += ce.ChunkSize
		off = ce.ChunkOffset + ce.ChunkSize
	}
	return nil
}
