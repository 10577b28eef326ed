"""The HTTP surface, one `APIRouter` per concern; `serving.api.main.api_router` gathers them."""
