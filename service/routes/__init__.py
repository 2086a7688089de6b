"""HTTP routes, one APIRouter per concern; the app factory includes them."""
