"""``lrponnx web``: look at heatmaps in the browser (onnxruntime-web); see docs/web.md."""
from __future__ import annotations

__all__ = ["register"]


def cmd_web(args) -> int:
    from lrponnx.app.web.server import serve

    return serve(args.explainer, host=args.host, port=args.port, ort_dist=args.ort_dist,
                 open_browser=not args.no_browser, allow_remote=args.allow_remote, quiet=not args.verbose)


def register(sub) -> None:
    p = sub.add_parser("web", help="serve a local page that explains images in the browser",
                       description="Serve a page on 127.0.0.1 that loads EXPLAINER with onnxruntime-web, "
                                   "explains a dropped or chosen image, shows the top classes, the heatmap "
                                   "and the overlay, and explains another class on a click.")
    p.add_argument("explainer", help="an explainer written by lrponnx convert")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host that is not a loopback address (the page is then reachable from "
                        "other machines)")
    p.add_argument("--ort-dist", default=None, metavar="DIR",
                   help="onnxruntime-web's dist folder (default: $LRPONNX_ORT_WEB, else "
                        "node_modules/onnxruntime-web/dist here or in the repository's tests/js)")
    p.add_argument("--no-browser", action="store_true", help="do not open a browser")
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.set_defaults(func=cmd_web)
