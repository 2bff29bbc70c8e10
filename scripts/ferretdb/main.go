// Command ferretdb-launcher runs an embedded FerretDB v1 on PostgreSQL (the
// default stack) or SQLite. `go install .../cmd/ferretdb` panics at start-up
// because the module lacks build/version/version.txt, so the project builds
// this tiny launcher around the embeddable package instead.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:27017", "TCP address to listen on")
	postgresURL := flag.String("postgresql-url", "", "PostgreSQL URL (the postgresql handler)")
	sqliteDir := flag.String("sqlite-dir", "", "directory for SQLite databases (the sqlite handler)")
	logLevel := flag.String("log-level", "warn", "debug, info, warn or error")
	flag.Parse()

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintln(os.Stderr, "bad --log-level:", err)
		os.Exit(2)
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	config := &ferretdb.Config{Listener: ferretdb.ListenerConfig{TCP: *listen}, Logger: logger}
	switch {
	case *postgresURL != "" && *sqliteDir == "":
		config.Handler = "postgresql"
		config.PostgreSQLURL = *postgresURL
	case *sqliteDir != "" && *postgresURL == "":
		if err := os.MkdirAll(*sqliteDir, 0o755); err != nil {
			fmt.Fprintln(os.Stderr, "cannot create --sqlite-dir:", err)
			os.Exit(1)
		}
		config.Handler = "sqlite"
		config.SQLiteURL = "file:" + *sqliteDir + "/"
	default:
		fmt.Fprintln(os.Stderr, "give exactly one of --postgresql-url and --sqlite-dir")
		os.Exit(2)
	}

	f, err := ferretdb.New(config)
	if err != nil {
		fmt.Fprintln(os.Stderr, "ferretdb:", err)
		os.Exit(1)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	logger.Info("ferretdb listening", "listen", *listen, "handler", config.Handler)
	if err := f.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "ferretdb:", err)
		os.Exit(1)
	}
}
